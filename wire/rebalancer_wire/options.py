"""Every solve option, declared once.

The solver's keyword checks, the server's reading of `rebalancer.v1.SolveOptions` (and the field its
BadRequest names), the client's request building, the CLI flags and the batcher's key are all derived
from `OPTIONS`. Adding an option means: a field in `SolveOptions` (same name), an `Option` here, the
solver keyword, a test.

Pure Python on purpose: the solver imports it without pulling in gRPC, and messages are read and
written through their descriptors, so this module needs no generated code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from typing import Any


class ArgumentError(ValueError, AssertionError):
    """A bad argument, with its name as data (`argument`), so no caller parses the message for it. Also an
    AssertionError: code written against the published DeepSeek function, which asserts its
    preconditions, keeps catching what it caught."""

    def __init__(self, argument: str, reason: str) -> None:
        super().__init__(f"{argument} {reason}")
        self.argument = argument
        self.reason = reason


# Where an option applies: "batch" knobs apply to a whole solver call (requests share a call only when
# they agree on them); "layer" options are turned into per-layer values, so requests that differ still
# share a call; "service" options steer the service around the solver and never reach it; "request"
# options (transfer budgets) cap one request's share of a call, so the service applies them per request to
# the split result, while the library applies them to the whole solve.
BATCH, LAYER, SERVICE, REQUEST = "batch", "layer", "service", "request"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Option:
    """One solve option: its name (solver keyword = `SolveOptions` field = client keyword), its type, range
    and default, and a line of documentation (the CLI help)."""

    name: str
    kind: type
    default: Any
    doc: str
    scope: str = BATCH
    minimum: float | None = None
    maximum: float | None = None
    maximum_excluded: bool = False
    choices: tuple[str, ...] = ()
    flag: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """`value` in this option's type and range (None stands for the default), else ArgumentError."""
        if value is None:
            return self.default
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ArgumentError(self.name, f"must be true or false, got {value!r}")
            return value
        if self.kind is str:
            return self._check_choice(value)
        if isinstance(value, bool) or not _is_number(value, integral=self.kind is int):
            raise ArgumentError(self.name, f"must be {'an integer' if self.kind is int else 'a number'}, got {value!r}")
        value = self.kind(value)
        if self.kind is float and math.isnan(value):
            raise ArgumentError(self.name, f"must be {self.range_text()}, got nan")
        too_high = self.maximum is not None and (
            value >= self.maximum if self.maximum_excluded else value > self.maximum
        )
        if (self.minimum is not None and value < self.minimum) or too_high:
            raise ArgumentError(self.name, f"must be {self.range_text()}, got {value!r}")
        return value

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.minimum is not None and self.maximum is not None:
            return f"in [{self.minimum}, {self.maximum}{')' if self.maximum_excluded else ']'}"
        if self.minimum is not None:
            return f">= {self.minimum}"
        return "a value of its type"

    def _check_choice(self, value: Any) -> str:
        if value not in self.choices:
            raise ArgumentError(self.name, f"must be {self.range_text()}, got {value!r}")
        return value


def _is_number(value: Any, *, integral: bool) -> bool:
    """int-like (numpy integers included) or, when not `integral`, any real number."""
    if integral:
        return hasattr(value, "__index__")
    return hasattr(value, "__float__") and not isinstance(value, (str, bytes))


OPTIONS: tuple[Option, ...] = (
    Option(
        "policy",
        str,
        "auto",
        "solver policy: auto (best of global and hierarchical per layer), global, hierarchical, or the "
        "published deepseek algorithm",
        choices=("auto", "deepseek", "global", "hierarchical"),
    ),
    Option(
        "num_candidates",
        int,
        None,
        "candidate plans per layer (default: 64 on a GPU, fewer on a CPU)",
        minimum=1,
        maximum=4096,
        flag="--candidates",
    ),
    Option(
        "seed",
        int,
        0,
        "seed of the candidates' noise; layer i uses seed + i",
        scope=LAYER,
        minimum=INT64_MIN,
        maximum=INT64_MAX,
    ),
    Option(
        "max_moves_per_layer",
        int,
        None,
        "cap on expert copies moved per layer from the placement in force",
        minimum=0,
        maximum=2**32 - 1,
        flag="--max-moves",
    ),
    # Planning to the last window's noise is wasted work: on the drifting series, 0.01 moves 0.15x the
    # copies of a fresh plan and is *more* balanced on the next window than tighter settings.
    Option(
        "balance_tolerance",
        float,
        0.01,
        "balancedness a plan may give up to move fewer copies from the placement in force",
        minimum=0.0,
        maximum=1.0,
        maximum_excluded=True,
    ),
    # 0 keeps `auto` never worse than the better reference policy (0.001 lost 3e-5 balancedness on
    # near-uniform loads); groups still stay local whenever that is free.
    Option(
        "locality_tolerance",
        float,
        0.0,
        "max-load increase auto accepts per layer to keep every expert group on one node",
        minimum=0.0,
        maximum=1.0,
        maximum_excluded=True,
    ),
    Option(
        "max_transfer_seconds",
        float,
        None,
        "cap on the estimated rearrangement time of a rebalance (cost model); layers that gain most per "
        "transferred byte move first, the rest keep their placement",
        scope=REQUEST,
        minimum=0.0,
        maximum=1e9,
    ),
    Option(
        "max_incoming_copies_per_gpu",
        int,
        None,
        "cap on the expert copies any one GPU receives in a rebalance, all layers together",
        scope=REQUEST,
        minimum=0,
        maximum=2**32 - 1,
        flag="--max-incoming",
    ),
    Option(
        "new_num_gpus",
        int,
        None,
        "plan for this many GPUs (scale by whole nodes) from the placement in force, keeping copies in place",
        minimum=1,
        maximum=2**32 - 1,
    ),
    Option("dry_run", bool, False, "plan and report, commit nothing", scope=SERVICE),
    Option("fresh", bool, False, "plan from scratch, ignoring the placement in force", scope=SERVICE),
)
BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
BATCH_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.scope == BATCH)


def _settings_methods() -> dict[str, Any]:
    def batch_kwargs(self) -> dict[str, Any]:
        """The solver keywords a whole solver call shares (layer-scoped ones, the seed, are per request)."""
        return {name: getattr(self, name) for name in BATCH_OPTIONS}

    def batch_key(self) -> tuple:
        """Requests that agree on these can share a solver call."""
        return tuple(getattr(self, name) for name in BATCH_OPTIONS)

    return {"batch_kwargs": batch_kwargs, "batch_key": batch_key}


SolveSettings = make_dataclass(
    "SolveSettings",
    [(o.name, o.kind if o.default is not None else (o.kind | None), field(default=o.default)) for o in OPTIONS],
    frozen=True,
    namespace=_settings_methods(),
)
SolveSettings.__module__ = __name__
SolveSettings.__doc__ = "Checked solve options, one attribute per `Option` (defaults filled in)."


def check(**values: Any) -> Any:
    """Keyword values -> SolveSettings, every value checked; ArgumentError names the first bad one."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise ArgumentError(unknown[0], f"is not a solve option (options: {', '.join(BY_NAME)})")
    return SolveSettings(**{name: BY_NAME[name].check(value) for name, value in values.items()})


def read_message(message: Any) -> tuple[Any, list[tuple[str, str]]]:
    """A `SolveOptions` message -> (SolveSettings, [(option name, reason)] for every bad value).

    Unset fields (no presence, or a zero where the default is "none") take the default; the policy enum
    is read by value name (POLICY_AUTO -> "auto"), an unknown number is a violation.
    """
    values, violations = {}, []
    for option in OPTIONS:
        try:
            values[option.name] = option.check(_field_value(message, option))
        except ArgumentError as error:
            violations.append((option.name, error.reason))
    settings = SolveSettings() if violations else SolveSettings(**values)
    return settings, violations


def fill_message(message: Any, settings: Any) -> Any:
    """Write `settings` into a `SolveOptions` message, in place; returns it. Every value is written, defaults
    included, so a server whose defaults differ still plans what the caller's declaration said."""
    for option in OPTIONS:
        value = getattr(settings, option.name)
        if value is None:
            continue
        descriptor = message.DESCRIPTOR.fields_by_name[option.name]
        if descriptor.enum_type is not None:
            value = descriptor.enum_type.values_by_name[_enum_prefix(descriptor) + value.upper()].number
        setattr(message, option.name, value)
    return message


def _field_value(message: Any, option: Option) -> Any:
    descriptor = message.DESCRIPTOR.fields_by_name[option.name]
    if descriptor.has_presence:
        return getattr(message, option.name) if message.HasField(option.name) else None
    value = getattr(message, option.name)
    if descriptor.enum_type is not None:
        if value == 0:
            return None
        number = descriptor.enum_type.values_by_number.get(value)
        return value if number is None else number.name.removeprefix(_enum_prefix(descriptor)).lower()
    if option.default is None and value == 0:
        return None
    return value


def _enum_prefix(descriptor: Any) -> str:
    """POLICY_ for the `Policy` enum: proto enum values carry their type's name as a prefix."""
    return descriptor.enum_type.values_by_number[0].name.removesuffix("UNSPECIFIED")
