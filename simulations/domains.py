"""The four synthetic sub-domains: vocabularies, the facts of one record, its prose in
several surface forms, its plain-text summary, and the extraction answer.

Two hospital-like sub-domains (``clinic`` visit notes, ``lab`` result reports) and two
bank-like ones (``payments`` card transactions, ``loans`` loan applications). Every value
in an answer is copied from the record or derived from it by a simple rule (a flag word, a
merchant type, a purpose phrase, a currency word, a term in years), so answers are
automatically checkable. Pure Python and deterministic: randomness comes from the
``random.Random`` streams callers pass in (:func:`_rng` derives them from string seeds).
Each record's prose falls in a fixed hash bucket (:func:`_bucket`): holdout, probe or train.
"""

from __future__ import annotations

import hashlib
import json
import random

DOMAINS: tuple[str, ...] = ("clinic", "lab", "payments", "loans")
HOSPITAL_DOMAINS: tuple[str, ...] = DOMAINS[:2]
BANK_DOMAINS: tuple[str, ...] = DOMAINS[2:]

# The JSON keys (in order) of each sub-domain's extraction answer.
SCHEMAS: dict[str, tuple[str, ...]] = {
    "clinic": ("name", "age", "diagnosis", "drug"),
    "lab": ("patient", "test", "value", "flag"),
    "payments": ("merchant", "amount", "currency", "category"),
    "loans": ("applicant", "loan_amount", "term_months", "purpose"),
}

# The JSON keys (in order) of each sub-domain's task answer: values drawn from closed
# vocabularies the record states or implies (a diagnosis and the drug given, a lab test
# and its flag, a currency and a merchant category, a loan term and purpose), so the
# answer is checkable by a rule and learnable without copying free-form names or numbers.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "clinic": ("diagnosis", "drug"),
    "lab": ("test", "flag"),
    "payments": ("currency", "category"),
    "loans": ("term_months", "purpose"),
}

INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "clinic": (
        "Extract the visit as JSON.",
        "Convert the visit note to JSON.",
        "Give the visit details as JSON.",
    ),
    "lab": (
        "Extract the lab result as JSON.",
        "Convert the lab report to JSON.",
        "Give the lab result details as JSON.",
    ),
    "payments": (
        "Extract the transaction as JSON.",
        "Convert the card payment to JSON.",
        "Give the transaction details as JSON.",
    ),
    "loans": (
        "Extract the loan application as JSON.",
        "Convert the loan request to JSON.",
        "Give the loan application details as JSON.",
    ),
}

_SEP = (", ", ": ")
_HOLDOUT_MOD = 5      # 1 in 5 records belongs to the holdout bucket
_PROBE_MOD = 11       # 1 in 11 (of the rest) belongs to the probe bucket

# --------------------------------------------------------------------------- vocabularies

FIRST_NAMES = (
    "Maria", "James", "Anna", "David", "Sofia", "Daniel", "Laura", "Peter", "Elena", "Thomas",
    "Grace", "Samuel", "Olivia", "Martin", "Nina", "Lucas", "Clara", "Oscar", "Helen", "Victor",
    "Alice", "Henry", "Julia", "Felix", "Irene", "George", "Emma", "Paul", "Rosa", "Adam",
    "Lena", "Hugo", "Carmen", "Ivan", "Nora", "Leo", "Sara", "Omar", "Mia", "Karl",
)
LAST_NAMES = (
    "Lopez", "Smith", "Novak", "Kim", "Rossi", "Weber", "Garcia", "Brown", "Silva", "Meyer",
    "Jensen", "Taylor", "Costa", "Fischer", "Moreau", "Nguyen", "Patel", "Kowalski", "Berg", "Ward",
    "Hughes", "Romero", "Keller", "Adams", "Sato", "Ortiz", "Hansen", "Russo", "Evans", "Duval",
    "Murphy", "Ali", "Dubois", "Larsen", "Cruz", "Fox", "Lang", "Reyes", "Bauer", "Price",
)
DOCTORS = ("Chen", "Okafor", "Lindqvist", "Haddad", "Moreno", "Park", "Schulz", "Ibrahim", "Varga", "Quinn")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
CITIES = ("Lisbon", "Boston", "Leeds", "Lyon", "Zurich", "Denver", "Porto", "Bristol", "Geneva", "Austin",
          "Dublin", "Munich")

# clinic: diagnosis -> (symptoms, drugs)
CLINIC = {
    "pneumonia": (("fever and a productive cough", "chest pain and fever"), ("amoxicillin", "azithromycin")),
    "bronchitis": (("a persistent cough", "cough and wheezing"), ("azithromycin", "salbutamol")),
    "migraine": (("a throbbing headache", "headache and nausea"), ("sumatriptan", "ibuprofen")),
    "hypertension": (("dizziness", "morning headaches"), ("lisinopril", "amlodipine")),
    "diabetes": (("increased thirst", "frequent urination"), ("metformin", "insulin")),
    "gastritis": (("stomach pain", "heartburn after meals"), ("omeprazole", "pantoprazole")),
    "sinusitis": (("facial pain and congestion", "a blocked nose"), ("amoxicillin", "fluticasone")),
    "asthma": (("shortness of breath", "wheezing at night"), ("salbutamol", "budesonide")),
    "tonsillitis": (("a sore throat", "painful swallowing"), ("penicillin", "ibuprofen")),
    "cystitis": (("burning on urination", "lower abdominal pain"), ("nitrofurantoin", "trimethoprim")),
    "cellulitis": (("a red swollen leg", "a warm painful rash"), ("cephalexin", "clindamycin")),
    "conjunctivitis": (("red itchy eyes", "a sticky eye"), ("chloramphenicol", "cetirizine")),
    "gout": (("a painful big toe", "a swollen ankle"), ("colchicine", "allopurinol")),
    "anemia": (("fatigue", "pale skin and tiredness"), ("ferrous sulfate", "folic acid")),
    "eczema": (("itchy dry skin", "a scaly rash"), ("hydrocortisone", "emollient cream")),
    "influenza": (("fever and body aches", "chills and a cough"), ("oseltamivir", "paracetamol")),
}
# symptomatic drugs that any visit may end with, so the drug is read from the note rather
# than guessed from the diagnosis
GENERAL_DRUGS = ("paracetamol", "ibuprofen", "naproxen")
CLINIC = {dx: (symptoms, drugs + tuple(g for g in GENERAL_DRUGS if g not in drugs)[:2])
          for dx, (symptoms, drugs) in CLINIC.items()}
DOSES = ("500 mg twice daily", "250 mg once daily", "10 mg at night", "one tablet daily",
         "two puffs as needed", "400 mg three times daily", "20 mg every morning")
FOLLOW_UPS = ("one week", "two weeks", "ten days", "a month", "three days", "six weeks")

# lab: test -> (unit, low, high, decimals)
LAB = {
    "glucose": ("mmol/L", 3.9, 5.6, 1),
    "sodium": ("mmol/L", 135, 145, 0),
    "potassium": ("mmol/L", 3.5, 5.1, 1),
    "hemoglobin": ("g/dL", 12.0, 17.0, 1),
    "creatinine": ("mg/dL", 0.6, 1.2, 2),
    "cholesterol": ("mmol/L", 3.0, 5.2, 1),
    "ferritin": ("ng/mL", 30, 400, 0),
    "platelets": ("x10^9/L", 150, 400, 0),
    "calcium": ("mmol/L", 2.2, 2.6, 2),
    "TSH": ("mIU/L", 0.4, 4.0, 1),
    "ALT": ("U/L", 7, 56, 0),
    "albumin": ("g/L", 35, 50, 0),
}
FLAG_PHRASES = {
    "high": ("above the reference range", "elevated", "high", "higher than normal"),
    "low": ("below the reference range", "low", "decreased", "lower than normal"),
    "normal": ("within normal limits", "normal", "within the reference range", "unremarkable"),
}
FLAG_CODES = {"high": "H", "low": "L", "normal": "N"}
LAB_FOLLOW = ("a repeat test was requested", "no action is needed yet", "the patient was called",
              "results were sent to the ward", "please review at the next visit")

# payments: merchant type -> category
MERCHANT_TYPES = {
    "Cafe": "dining", "Bistro": "dining", "Pizzeria": "dining", "Grill": "dining",
    "Market": "groceries", "Grocers": "groceries", "Foods": "groceries",
    "Fuel": "fuel", "Petrol": "fuel",
    "Airways": "travel", "Rail": "travel", "Hotel": "travel",
    "Pharmacy": "health", "Optics": "health", "Dental": "health",
    "Books": "shopping", "Electronics": "shopping", "Outfitters": "shopping", "Hardware": "shopping",
    "Cinema": "entertainment", "Arcade": "entertainment",
}
MERCHANT_PREFIXES = (
    "Harbor", "Sunrise", "Maple", "Northgate", "Bluebird", "Riverside", "Oakwood", "Summit", "Golden",
    "Cedar", "Lakeside", "Metro", "Corner", "Atlas", "Pioneer", "Willow", "Redstone", "Horizon",
    "Beacon", "Union", "Seaside", "Hilltop", "Central", "Orchard",
)
CURRENCIES = {"EUR": ("euros", "EUR"), "USD": ("dollars", "USD"), "GBP": ("pounds", "GBP"),
              "CHF": ("Swiss francs", "CHF")}

# loans: purpose label -> phrases
PURPOSES = {
    "auto": ("to buy a used car", "to purchase a new car", "to replace an old van"),
    "home": ("to renovate the kitchen", "to repair the roof", "for home improvements"),
    "education": ("to pay tuition fees", "to fund a master's degree", "for university costs"),
    "business": ("to expand a small bakery", "to buy equipment for a workshop", "to open a food truck"),
    "debt": ("to consolidate credit card debt", "to pay off existing loans", "to refinance older debts"),
    "medical": ("to cover dental surgery", "to pay hospital bills", "for a knee operation"),
}
JOBS = ("nurse", "teacher", "electrician", "software developer", "accountant", "chef", "driver",
        "pharmacist", "carpenter", "sales manager", "farmer", "designer")
LOAN_TERMS = (6, 12, 18, 24, 30, 36, 48, 60, 72, 84)
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}


# --------------------------------------------------------------------------- helpers

def _stable_hash(text: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}|{text}".encode("utf-8")).digest()[:8], "big")


def _bucket(text: str) -> str:
    """'holdout', 'probe' or 'train' for a record's prose; fixed forever, seed independent."""
    if _stable_hash(text, "split") % _HOLDOUT_MOD == 0:
        return "holdout"
    if _stable_hash(text, "probe") % _PROBE_MOD == 0:
        return "probe"
    return "train"


def _rng(*parts: object) -> random.Random:
    """An independent stream per purpose; str seeds hash with SHA-512, stable across runs."""
    return random.Random("|".join(str(p) for p in parts))


def _dumps(obj: dict) -> str:
    return json.dumps(obj, separators=_SEP)


def _num(value: float | int) -> str:
    """The exact text of a number, identical in prose and in JSON."""
    return json.dumps(value)


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"


# --------------------------------------------------------------------------- facts

def _facts(domain: str, rng: random.Random) -> dict:
    if domain == "clinic":
        diagnosis = rng.choice(sorted(CLINIC))
        symptoms, drugs = CLINIC[diagnosis]
        return {"name": _name(rng), "age": rng.randint(18, 89), "diagnosis": diagnosis,
                "drug": rng.choice(drugs), "symptom": rng.choice(symptoms), "doctor": rng.choice(DOCTORS),
                "date": _date(rng), "dose": rng.choice(DOSES), "follow": rng.choice(FOLLOW_UPS),
                "bp": f"{rng.randint(105, 165)}/{rng.randint(65, 100)}",
                "temp": f"{rng.randint(363, 395) / 10:.1f}"}
    if domain == "lab":
        test = rng.choice(sorted(LAB))
        unit, lo, hi, dec = LAB[test]
        flag = rng.choices(("low", "normal", "high"), weights=(1, 2, 1))[0]
        span = hi - lo
        if flag == "normal":
            x = rng.uniform(lo + 0.05 * span, hi - 0.05 * span)
        elif flag == "low":
            x = rng.uniform(lo - 0.5 * span if lo - 0.5 * span > 0 else lo * 0.4, lo - 0.05 * span)
        else:
            x = rng.uniform(hi + 0.05 * span, hi + 0.8 * span)
        value: float | int = round(x, dec) if dec else int(round(x))
        return {"patient": _name(rng), "test": test, "value": value, "flag": flag, "unit": unit,
                "lo": _num(lo), "hi": _num(hi), "sample": f"S-{rng.randint(10000, 99999)}",
                "doctor": rng.choice(DOCTORS), "date": _date(rng), "follow": rng.choice(LAB_FOLLOW)}
    if domain == "payments":
        mtype = rng.choice(sorted(MERCHANT_TYPES))
        dollars = int(round(10 ** rng.uniform(0.4, 3.2)))
        cents = rng.choice([c for c in range(1, 100) if c % 10])
        currency = rng.choice(sorted(CURRENCIES))
        return {"merchant": f"{rng.choice(MERCHANT_PREFIXES)} {mtype}", "amount": float(f"{dollars}.{cents:02d}"),
                "currency": currency, "category": MERCHANT_TYPES[mtype], "last4": f"{rng.randint(0, 9999):04d}",
                "city": rng.choice(CITIES), "date": _date(rng),
                "time": f"{rng.randint(6, 22):02d}:{rng.randint(0, 59):02d}"}
    if domain == "loans":
        purpose = rng.choice(sorted(PURPOSES))
        return {"applicant": _name(rng), "loan_amount": rng.randint(2, 160) * 500,
                "term_months": rng.choice(LOAN_TERMS), "purpose": purpose,
                "purpose_text": rng.choice(PURPOSES[purpose]), "job": rng.choice(JOBS),
                "income": rng.randint(18, 140) * 1000, "score": rng.randint(520, 840),
                "app_id": rng.randint(1000, 9999), "date": _date(rng)}
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def _answer(domain: str, f: dict) -> dict:
    """All key facts of a record (the pretraining corpus restates these)."""
    return {k: f[k] for k in SCHEMAS[domain]}


def _task_answer(domain: str, f: dict) -> dict:
    """The task's JSON answer for a record."""
    return {k: f[k] for k in TASK_FIELDS[domain]}


# --------------------------------------------------------------------------- prose

def _term_text(months: int, rng: random.Random) -> str:
    if months % 12 == 0 and rng.random() < 0.5:
        years = months // 12
        word = _NUMBER_WORDS[years] if rng.random() < 0.3 else str(years)
        return f"{word} year" + ("s" if years > 1 else "")
    return f"{months} months"


def _currency_amount(f: dict, rng: random.Random) -> str:
    word, code = CURRENCIES[f["currency"]]
    amount = _num(f["amount"])
    r = rng.random()
    if r < 0.4:
        return f"{amount} {code}"
    if r < 0.75:
        return f"{code} {amount}"
    return f"{amount} {word}"


def _prose(domain: str, f: dict, rng: random.Random) -> str:
    """One record in one of several surface forms (with optional distractor details)."""
    t = rng.randrange(6)
    if domain == "clinic":
        n, a, dx, rx, sy = f["name"], f["age"], f["diagnosis"], f["drug"], f["symptom"]
        doc, date, dose, fu = f["doctor"], f["date"], f["dose"], f["follow"]
        first = n.split()[0]
        forms = (
            f"{n}, a {a}-year-old patient, was seen by Dr. {doc} on {date} with {sy}. "
            f"Diagnosis: {dx}. Started on {rx}. Follow-up in {fu}.",
            f"Visit note ({date}). Patient: {n}, age {a}. Complaint: {sy}. Assessment: {dx}. "
            f"Plan: {rx} {dose}, review in {fu}.",
            f"{n} ({a}) came to the clinic complaining of {sy}. Dr. {doc} diagnosed {dx} and prescribed {rx}.",
            f"Outpatient visit on {date}: {a}-year-old {n} presented with {sy}. "
            f"The impression was {dx} and {rx} was prescribed. {n} will return in {fu}.",
            f"Dr. {doc} saw {n}, aged {a}, for {sy}. The working diagnosis is {dx}. "
            f"{first} was started on {rx} {dose}.",
            f"Seen today: {n}, {a} years old. Reports {sy}. BP {f['bp']}, temperature {f['temp']} C. "
            f"Dx {dx}. Rx {rx} {dose}.",
        )
        return forms[t]
    if domain == "lab":
        n, test, v, unit = f["patient"], f["test"], _num(f["value"]), f["unit"]
        flag, lo, hi, sid = f["flag"], f["lo"], f["hi"], f["sample"]
        phrase = rng.choice(FLAG_PHRASES[flag])
        forms = (
            f"Lab report for {n} (sample {sid}), collected {f['date']}. {test}: {v} {unit} "
            f"(ref {lo}-{hi}), {phrase}.",
            f"{n}'s {test} came back at {v} {unit}, which is {phrase}. Ordered by Dr. {f['doctor']}.",
            f"Result: {test} {v} {unit} [{FLAG_CODES[flag]}] for patient {n}, sample {sid}.",
            f"The {test} level for {n} was measured at {v} {unit} on {f['date']}; reference range "
            f"{lo} to {hi} {unit}. The result is {phrase}.",
            f"Sample {sid} from {n}, received {f['date']}. Test: {test}. Value: {v} {unit}. "
            f"Flag: {flag.upper() if rng.random() < 0.5 else phrase}.",
            f"Dr. {f['doctor']} reviewed the results of {n}: {test} of {v} {unit} is {phrase}; {f['follow']}.",
        )
        return forms[t]
    if domain == "payments":
        m, money, city, date, last4 = f["merchant"], _currency_amount(f, rng), f["city"], f["date"], f["last4"]
        forms = (
            f"Card ending {last4} was charged {money} at {m} on {date}.",
            f"Transaction alert: {m}, {city}. Amount {money}. Status: approved.",
            f"On {date} a payment of {money} to {m} was authorized on the card ending in {last4}.",
            f"{m} ({city}) - {money} - {date} {f['time']} - card ending {last4}.",
            f"You spent {money} at {m} in {city} at {f['time']}. If this was not you, contact the bank.",
            f"Purchase recorded: {money} to merchant {m}, terminal in {city}, {date}.",
        )
        return forms[t]
    if domain == "loans":
        n, amt, pt = f["applicant"], _num(f["loan_amount"]), f["purpose_text"]
        term = _term_text(f["term_months"], rng)
        inc, job = _num(f["income"]), f["job"]
        forms = (
            f"{n} applied for a loan of {amt} over {term} {pt}.",
            f"Loan application #{f['app_id']}. Applicant: {n}, {job}. Requested: {amt} over {term}. "
            f"Purpose: {pt}.",
            f"{n}, who works as a {job} and earns {inc} a year, is asking to borrow {amt} {pt}, "
            f"repaid over {term}.",
            f"Application received on {f['date']} from {n} for {amt} dollars, term {term}, credit score "
            f"{f['score']}. The funds are {pt}.",
            f"Request to borrow {amt} {pt}. Applicant {n}, annual income {inc}. Term: {term}. "
            f"{n} was asked to upload recent pay slips.",
            f"{n} would like a loan of {amt} {pt}. Repayment over {term} at a fixed rate.",
        )
        return forms[t]
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def _summary(domain: str, f: dict, rng: random.Random) -> str:
    """A structured restatement of a record in a format that is NOT the task's JSON.

    Used only in the pretraining corpus so the base learns to copy entities across
    formats (and sees braces, quotes, colons and the normalized labels).
    """
    t = rng.randrange(5)
    ans = _answer(domain, f)
    keys, vals = list(ans), [v if isinstance(v, str) else _num(v) for v in ans.values()]
    if t == 0:      # key: value list with the schema's own key words
        return "Summary - " + "; ".join(f"{k}: {v}" for k, v in zip(keys, vals)) + "."
    if t == 1:      # brace record, unquoted (on its own line, so "{" is seen without a space)
        return "{" + ";".join(f"{k}={v}" for k, v in zip(keys, vals)) + "}"
    if t == 2:      # pipe table row
        return " | ".join(vals)
    if domain == "clinic":
        n, a, dx, rx = vals
        return (f'Patient "{n}" ({a}) was seen for "{dx}" and given "{rx}".' if t == 3 else
                f"In short, {n}, {a}, has {dx} and takes {rx}.")
    if domain == "lab":
        n, test, v, flag = vals
        return (f'Result for "{n}": "{test}" = {v} ("{flag}").' if t == 3 else
                f"In short, the {test} of {n} is {v} {f['unit']}, flagged {flag}.")
    if domain == "payments":
        m, amt, cur, cat = vals
        return (f'Paid "{m}" {amt} "{cur}" (type "{cat}").' if t == 3 else
                f"In short, {amt} {cur} went to {m}, a {cat} expense.")
    if domain == "loans":
        n, amt, term, p = vals
        return (f'Borrower "{n}" asks {amt} for {term} months ("{p}").' if t == 3 else
                f"In short, {n} wants {amt} for {term} months, purpose {p}.")
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
