"""Server optimizers: how the round's weighted mean delta becomes the next global adapter.

The weighted mean delta ``d = sum_k w_k delta_k / sum_k w_k`` is the negated pseudo-gradient
of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021, arXiv:2003.00295), and each
rule here is one line of their Algorithm 2, per tensor, elementwise, in float32:

* ``sgd``:        x += lr * d                                  (FedAvg with a server lr)
* ``fedavgm``:    m = beta1 m + d;  x += lr * m                (Hsu et al. 2019, arXiv:1909.06335)
* ``fedadagrad``: v = v + d^2;  x += lr * d / (sqrt(v) + tau)
* ``fedadam``:    m = beta1 m + (1 - beta1) d;  v = beta2 v + (1 - beta2) d^2;
                  x += lr * m / (sqrt(v) + tau)
* ``fedyogi``:    m as fedadam;  v = v - (1 - beta2) d^2 sign(v - d^2);  x += lr * m / (sqrt(v) + tau)

and one rule that is not in Algorithm 2:

* ``fedexp``:     x += lr * eta d,  eta = max(1, sum_k p_k ||delta_k||^2 / (2 (||d||^2 + tau)))
                  (Jhunjhunwala, Wang & Joshi, "FedExP", ICLR 2023, arXiv:2301.09604; p_k = w_k / sum w)

FedExP extrapolates FedAvg's step when the tenants' updates disagree: for updates of equal
norm the ratio is 1/2 when all agree (eta = 1, FedAvg) and M/2 when M of them are orthogonal,
as under strongly non-IID data, where each tenant's progress on its own data is otherwise
divided by M in the mean. ``tau`` is the paper's epsilon (its default is 1e-3 too). It needs
each update's norm, which a sum does not give: it is refused with secure aggregation and with
central DP (the step size would depend on the un-noised norms).

Moments start at zero and there is no bias correction. That matches Flower's own
``FedAvgM``, ``FedAdagrad`` (its beta_1 = 0, so m = d) and ``FedYogi`` exactly, and
``FedAdam`` except that Flower's FedAdam also scales its lr by
``sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))``, which Algorithm 2 does not. (The paper
allows any ``v_{-1} >= tau^2``; zero, as in Flower, keeps the first step's size set by
``tau`` alone.) The adaptive rules want a much smaller ``federation.server-lr`` than
FedAvg's 1.0: Reddi et al. tune it around 1e-2 .. 1e-1 (their Table 8).

Every rule needs only the weighted **sum**, so it runs under secure aggregation; under
central DP it acts on the noised sum, which is post-processing and costs no privacy.

``sgd`` is :func:`fedlora.server.aggregation.apply_mean` itself, so a default run is unchanged to
the bit. The others keep their moments (``m``, ``v``) as adapter-sized float32 arrays; they
travel between processes as :meth:`ServerOptimizer.state_arrays` (``m/<tensor>``,
``v/<tensor>``), which the round recorder writes with safetensors beside the checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np

from fedlora.server.aggregation import Arrays, WeightedSum, apply_mean, mean_delta


class ServerOptimizer:
    """One rule of Reddi et al.'s Algorithm 2 (see the module docstring)."""

    name = "base"
    moments: tuple[str, ...] = ()  # the moment vectors the rule keeps
    needs_update_norms = False  # True: the sum must carry sum_k w_k ||delta_k||^2 / sum_k w_k
    uses: tuple[str, ...] = ("lr",)  # the hyperparameters it reads (for describe())

    def __init__(self, *, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self._state: dict[str, OrderedDict[str, np.ndarray]] = {}  # moment -> tensor name -> array

    def describe(self) -> str:
        names = {"lr": "server lr", "beta1": "beta1", "beta2": "beta2", "tau": "tau"}
        return f"{self.name} ({', '.join(f'{names[h]} {getattr(self, h):g}' for h in self.uses)})"

    def step(self, global_state: Arrays, summed: WeightedSum) -> "OrderedDict[str, np.ndarray]":
        """The next global adapter; updates the moments in place."""
        d = mean_delta(summed)  # fresh float32 arrays: the rules overwrite them with the step
        self._init_moments(global_state)
        lr = np.float32(self.lr)
        out: "OrderedDict[str, np.ndarray]" = OrderedDict()
        for k, x in global_state.items():
            step = d[k]
            self._direction(k, step)  # step <- the update direction (d, m or m / (sqrt(v) + tau))
            np.multiply(step, lr, out=step)
            np.add(step, x, out=step)
            out[k] = step.astype(x.dtype, copy=False)
        return out

    def _direction(self, k: str, d: np.ndarray) -> None:
        raise NotImplementedError

    def round_info(self) -> dict[str, float]:
        """What the last step decided, for the round record (empty for most rules)."""
        return {}

    def _init_moments(self, global_state: Arrays) -> None:
        if not self.moments:
            return
        if not self._state:
            self._state = {m: OrderedDict((k, np.zeros(np.shape(v), np.float32)) for k, v in global_state.items())
                           for m in self.moments}
            return
        for m, arrays in self._state.items():
            if set(arrays) != set(global_state) or any(arrays[k].shape != np.shape(v)
                                                       for k, v in global_state.items()):
                raise ValueError(f"{self.name}: the moments {m!r} do not match the adapter's tensor names and "
                                 "shapes (was the state saved for another adapter?)")

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The moments as ``{"m/<tensor>": array, "v/<tensor>": array}`` (empty for ``sgd`` and
        before the first step). The live arrays, not copies: save them before the next step."""
        return {f"{m}/{k}": v for m, arrays in self._state.items() for k, v in arrays.items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore moments saved by :meth:`state_arrays` (of an optimizer of the same kind)."""
        state: dict[str, OrderedDict[str, np.ndarray]] = {}
        for key in sorted(arrays):  # safetensors returns names sorted; so does get_state
            m, _, k = key.partition("/")
            if m not in self.moments or not k:
                raise ValueError(f"{self.name} keeps moments {list(self.moments) or 'none'}; "
                                 f"the saved state holds {key!r}")
            state.setdefault(m, OrderedDict())[k] = np.array(arrays[key], dtype=np.float32, copy=True)
        if state and (set(state) != set(self.moments) or len({frozenset(a) for a in state.values()}) != 1):
            raise ValueError(f"{self.name} needs moments {list(self.moments)} over the same tensors; "
                             f"the saved state holds {sorted(state)}")
        self._state = state


class SGD(ServerOptimizer):
    """x += lr * d: FedAvg (lr 1) with a server learning rate, bit for bit ``apply_mean``."""

    name = "sgd"

    def step(self, global_state, summed):
        return apply_mean(global_state, summed, server_lr=self.lr)


class FedExP(ServerOptimizer):
    """x += lr * eta * d with FedExP's eta (see the module docstring); no moments."""

    name = "fedexp"
    needs_update_norms = True
    uses = ("lr", "tau")

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.eta = 1.0

    def step(self, global_state, summed):
        if summed.sq_norm_mean is None:
            raise ValueError("fedexp needs the updates' mean squared norm, which this aggregate lacks "
                             "(secure aggregation and central DP reveal only a sum)")
        d_sq = sum(float(np.dot(v.ravel(), v.ravel())) for v in summed.total.values()) / summed.weight ** 2
        denominator = 2.0 * (d_sq + self.tau)  # 0 only for d = 0 with tau = 0: no step to extrapolate
        self.eta = max(1.0, summed.sq_norm_mean / denominator) if denominator > 0 else 1.0
        return apply_mean(global_state, summed, server_lr=self.lr * self.eta)

    def round_info(self):
        return {"fedexp_eta": round(self.eta, 6)}


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): m = beta1 m + d; x += lr * m."""

    name = "fedavgm"
    moments = ("m",)
    uses = ("lr", "beta1")

    def _direction(self, k, d):
        m = self._state["m"][k]
        np.multiply(m, np.float32(self.beta1), out=m)
        np.add(m, d, out=m)
        np.copyto(d, m)


class FedAdagrad(ServerOptimizer):
    """v = v + d^2; x += lr * d / (sqrt(v) + tau)."""

    name = "fedadagrad"
    moments = ("v",)
    uses = ("lr", "tau")

    def _direction(self, k, d):
        v = self._state["v"][k]
        sq = np.square(d)
        np.add(v, sq, out=v)
        _divide_by_root(d, v, self.tau, scratch=sq)


class FedAdam(ServerOptimizer):
    """m = beta1 m + (1 - beta1) d; v = beta2 v + (1 - beta2) d^2; x += lr * m / (sqrt(v) + tau)."""

    name = "fedadam"
    moments = ("m", "v")
    uses = ("lr", "beta1", "beta2", "tau")

    def _second_moment(self, v: np.ndarray, sq: np.ndarray) -> None:
        np.multiply(v, np.float32(self.beta2), out=v)
        np.multiply(sq, np.float32(1.0 - self.beta2), out=sq)
        np.add(v, sq, out=v)

    def _direction(self, k, d):
        m, v = self._state["m"][k], self._state["v"][k]
        sq = np.square(d)
        self._second_moment(v, sq)
        np.multiply(m, np.float32(self.beta1), out=m)
        np.multiply(d, np.float32(1.0 - self.beta1), out=d)
        np.add(m, d, out=m)
        np.copyto(d, m)
        _divide_by_root(d, v, self.tau, scratch=sq)


class FedYogi(FedAdam):
    """As fedadam, but v = v - (1 - beta2) d^2 sign(v - d^2): v moves toward d^2 additively."""

    name = "fedyogi"

    def _second_moment(self, v, sq):
        sign = np.subtract(v, sq)
        np.sign(sign, out=sign)
        np.multiply(sq, np.float32(1.0 - self.beta2), out=sq)
        np.multiply(sq, sign, out=sq)
        np.subtract(v, sq, out=v)


def _divide_by_root(d: np.ndarray, v: np.ndarray, tau: float, *, scratch: np.ndarray) -> None:
    """d <- d / (sqrt(v) + tau), with ``scratch`` (same shape) as the denominator."""
    np.sqrt(v, out=scratch)
    np.add(scratch, np.float32(tau), out=scratch)
    np.divide(d, scratch, out=d)


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (SGD, FedExP, FedAvgM, FedAdagrad, FedAdam, FedYogi)}


def make_server_optimizer(cfg) -> ServerOptimizer:
    """The server optimizer a :class:`fedlora.common.config.FederationConfig` names."""
    try:
        cls = OPTIMIZERS[cfg.server_optimizer]
    except KeyError:
        raise ValueError(f"unknown server optimizer {cfg.server_optimizer!r}; "
                         f"choose one of {', '.join(OPTIMIZERS)}") from None
    return cls(lr=cfg.server_lr, beta1=cfg.server_beta1, beta2=cfg.server_beta2, tau=cfg.server_tau)


def resume_mismatch(saved: Mapping, configured: str) -> str | None:
    """Why a run whose recorded optimizer state is ``saved`` cannot continue under
    ``federation.server-optimizer = configured`` (None: it can). Runs recorded before server
    optimizers existed ran ``sgd``."""
    name = saved.get("name", "sgd")
    if name == configured:
        return None
    return (f"the run was trained with federation.server-optimizer = {name!r}, not {configured!r}; "
            f"resume it with {name!r} or start a new run")
