"""Print what a finished fedlora run left in its run directory: the final adapter, and per
round the tenants sampled and finished and each tenant's training and evaluation metrics.

    python summary.py RUN_DIR      (exit 1 when the run has no final adapter)
Only the standard library: it reads the JSON files the ServerApp wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _metrics(values: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(values.items()))


def main(run_dir: Path) -> int:
    done = run_dir / "FEDERATION_DONE"
    failed = run_dir / "FEDERATION_FAILED"
    if done.is_file():
        adapter = run_dir / json.loads(done.read_text())["adapter"]
        files = sorted(p.name for p in adapter.iterdir()) if adapter.is_dir() else []
        print(f"final adapter: {adapter} ({', '.join(files)})")
    elif failed.is_file():
        print(f"the federation failed: {json.loads(failed.read_text()).get('failure')}")
    else:
        print(f"no final adapter in {run_dir} (neither FEDERATION_DONE nor FEDERATION_FAILED)")
    for path in sorted((run_dir / "metrics").glob("round_*.json")):
        r = json.loads(path.read_text())
        print(f"round {r['round']}: sampled {', '.join(r['sampled']) or '-'}; finished {', '.join(r['finished']) or '-'}; "
              f"aggregated {'yes' if r['aggregated'] else 'no'}; secure aggregation "
              f"{'on' if r.get('secagg', {}).get('enabled') else 'off'}; {r['seconds']:.1f} s; "
              f"{r['bytes_up']} bytes up, {r['bytes_down']} bytes down")
        for d in r.get("dropped", []):
            print(f"  dropped tenant {d['tenant']}: {d['reason']}")
        for tenant in sorted(set(r["train"]) | set(r["eval"]), key=lambda t: (len(t), t)):
            print(f"  tenant {tenant} train: {_metrics(r['train'].get(tenant, {}))}")
            print(f"  tenant {tenant} eval:  {_metrics(r['eval'].get(tenant, {}))}")
    return 0 if done.is_file() else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
