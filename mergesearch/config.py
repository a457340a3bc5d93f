"""Job configuration: frozen pydantic models loaded from a YAML file.

``load_config(path)`` reads a job YAML safely, validates it, resolves relative paths (models, data, task
folders, Python files) against the YAML's folder — never the working directory — and turns any problem into
a one-line :class:`ConfigError` that names the file, the key path and, for unknown keys, the closest valid key.
"""

from __future__ import annotations

import difflib
import itertools
import keyword
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from mergesearch.errors import ConfigError
from mergesearch.merging.methods import searchable_params


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Range(_Frozen):
    """A closed interval ``[low, high]`` searched for one parameter; written ``[low, high]`` in YAML."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError("a range is [low, high]")
            return {"low": value[0], "high": value[1]}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class LayerSpace(_Frozen):
    """Layer-wise architecture choices (Sakana DFS / HM3 style).

    Each output slot ``k`` (``slots`` of them, by default the base's layer count) is filled by one of
    ``choices``: ``merged`` (the merged layer at the slot's depth), ``base``, a source model's name
    (its layer at the slot's depth), or ``skip`` (slot left out). The merged network keeps between
    ``min_layers`` and ``max_layers`` layers.
    """

    slots: int | None = None
    choices: list[str] = Field(default_factory=lambda: ["merged", "skip"])
    min_layers: int | None = None
    max_layers: int | None = None
    #: also search which source depth fills a slot (offset from the slot's own depth, within +-depth_offset).
    depth_offset: int = 0

    @field_validator("choices", mode="before")
    @classmethod
    def _index_as_name(cls, value: Any) -> Any:
        # a model may be named by its index, which YAML reads as an int
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("choices")
    @classmethod
    def _nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("layers.choices is empty")
        return value


class TwinTargets(_Frozen):
    """Which linear modules of the decoder layers carry exclusive factors, as PEFT's ``target_modules`` and
    ``layers_to_transform`` say it: ``modules`` are module names or name suffixes (``q_proj``,
    ``mlp.down_proj``; a module matches when its name equals one or ends with ``.`` + one), ``layers`` decoder
    layer indices; ``None``: every linear module / every layer."""

    modules: list[str] | None = None
    layers: list[int] | None = None

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not m or m.startswith(".") or m.endswith(".") for m in value)):
            raise ValueError("modules: a non-empty list of module names or name suffixes such as q_proj")
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0 or len(set(value)) != len(value)):
            raise ValueError("layers: a non-empty list of distinct layer indices >= 0")
        return value


class TwinDistill(_Frozen):
    """Fit the exclusive factors to the experts' outputs (knowledge distillation) after the SVD: starting from
    the rank-r SVD factors, ``steps`` Adam steps at ``lr`` on ``batch`` sequences (all experts together, each
    row with its expert's adapter) minimise the KL divergence from expert t's next-token distribution (over its
    ``top_k`` most likely tokens and "any other") on task t's fit prompts (``fit_data``, else its search prompts)
    followed by expert t's greedy continuation (at most ``max_new_tokens`` tokens), at the positions that predict
    the continuation, both distributions softened by ``temperature`` (knowledge distillation's T; the KL is
    scaled by T²). Costs ``steps`` forward and backward passes of ``batch`` sequences per trial; the experts'
    targets are computed once per worker. See :mod:`mergesearch.twin.distill`."""

    steps: int = Field(default=100, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    batch: int = Field(default=96, ge=1)
    max_new_tokens: int = Field(default=16, ge=1)
    top_k: int = Field(default=64, ge=1)
    temperature: float = Field(default=4.0, gt=0)


class TwinSpace(_Frozen):
    """Twin-Merging for every candidate of the space: the candidate's merge is shared, each expert keeps its
    exclusive part θt − θ* at rank ``rank`` (a fixed int, or ``[low, high]``: searched), mixed per input by a
    router trained on the tasks' search prompts.

    ``experts`` maps task objective names to models (a path as in ``models`` or its index); by default the task
    objectives and the models pair up in order. ``router``: router settings (``width``, ``steps``, ``lr``,
    ``window``). ``targets``: named sets of modules that carry factors (:class:`TwinTargets`; default ``all``,
    every linear module of the decoder layers); two or more are a searched choice. ``distill``: fit the factors
    to the experts' outputs (:class:`TwinDistill`; ``null``, the default: the SVD factors as the paper has them).
    ``fit_data``: task objective name -> a ``.txt`` or JSONL (``prompt``) file of that task's prompts, one per
    routed task; the router is trained and the factors distilled on these instead of the objectives' search
    prompts, which must not contain any of them, so trials are scored on prompts they were not fitted on
    (``null``, the default: fitted on the search prompts, whose scores are then in-sample; see
    :mod:`mergesearch.twin.data`).
    """

    rank: int | Range
    experts: dict[str, str] | None = None
    router: dict[str, Any] = Field(default_factory=dict)
    targets: dict[str, TwinTargets] = Field(default_factory=lambda: {"all": TwinTargets()})
    distill: TwinDistill | None = None
    fit_data: dict[str, Path] | None = None

    @field_validator("fit_data")
    @classmethod
    def _fit_data(cls, value: dict[str, Path] | None) -> dict[str, Path] | None:
        if value is not None and not value:
            raise ValueError("fit_data: name one prompt file per routed task objective (objective: file)")
        return value

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: dict[str, TwinTargets]) -> dict[str, TwinTargets]:
        if not value:
            raise ValueError("targets: name at least one set of modules (e.g. all: {})")
        bad = [k for k in value if not re.fullmatch(r"[A-Za-z0-9_-]+", k)]
        if bad:
            raise ValueError(f"targets: {bad[0]!r} is not a name (letters, digits, _ and -)")
        return value

    @field_validator("experts", mode="before")
    @classmethod
    def _index_as_name(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: str(v) for k, v in value.items()}
        return value

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: int | Range) -> int | Range:
        low = value if isinstance(value, int) else value.low
        if low < 0 or (isinstance(value, Range) and (value.low != int(value.low) or value.high != int(value.high))):
            raise ValueError("rank is a non-negative int or [low, high] of ints")
        return value

    @field_validator("router")
    @classmethod
    def _router_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        known = {"width", "steps", "lr", "weight_decay", "window", "chat_template", "batch_size"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown router setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return value


class _SpaceBase(_Frozen):
    """What is searched: merge methods, per-model weight/density per layer group, method parameters, layers.

    Besides the keys below, every float parameter of a merge method (``weight``, ``density``, ``lambda``, ``t``,
    ``epsilon``, ``select_topk``, …; the table in :mod:`mergesearch.merging.methods`) is a key whose value is the
    range searched (``[low, high]``) or ``null`` (not searched: the method's default applies). A parameter the
    job leaves out takes the table's default search range (``weight`` [0, 1], ``density`` [0.1, 1]) or is not
    searched.
    """

    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic"])
    #: ``global`` (one value per model), ``per_layer``, or an int N (groups of N consecutive layers).
    granularity: Literal["global", "per_layer"] | int = "global"
    #: split each layer group by tensor-name filters (e.g. ``[self_attn, mlp]``).
    filters: list[str] = Field(default_factory=list)
    layers: LayerSpace | None = None
    twin: TwinSpace | None = None
    #: permutation alignment of each expert to the base before its task vector is taken (``weights``: Git
    #: Re-Basin weight matching; ``activations``: correlation of activations on unlabelled prompts); a list of
    #: several is a searched choice.
    align: list[Literal["none", "weights", "activations"]] = Field(default_factory=lambda: ["none"])
    #: prompts for ``activations`` (``.txt`` or JSONL with ``prompt``); default: the task objectives' search data
    align_data: Path | None = None
    #: variance-collapse correction: per task, affine maps of every block's output giving it expert t's
    #: per-channel mean and std on that task's search prompts, mixed per input by a router (a list: searched)
    correct: list[Literal["none", "variance"]] = Field(default_factory=lambda: ["none"])

    @field_validator("granularity")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("granularity must be 'global', 'per_layer' or a positive int")
        return value

    @field_validator("align")
    @classmethod
    def _align_unique(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("space.align lists each of none, weights, activations at most once, and one at least")
        return value

    @field_validator("methods")
    @classmethod
    def _methods_nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("space.methods is empty")
        return value

    def ranges(self) -> dict[str, Range | None]:
        """Parameter name -> searched range (None: not searched), for every float parameter of any method."""
        return {name: getattr(self, _attr(name)) for name in searchable_params()}


def _attr(name: str) -> str:
    """The Python attribute of a parameter's range (``lambda`` is a keyword: ``lambda_``)."""
    return f"{name}_" if keyword.iskeyword(name) else name


def _range_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, p in searchable_params().items():
        default = None if p.search is None else Range(low=p.search[0], high=p.search[1])
        fields[_attr(name)] = (Range | None, Field(default=default, alias=name if _attr(name) != name else None))
    return fields


#: the job's ``space:`` section; one range field per method parameter, generated from the method table.
SpaceConfig = create_model("SpaceConfig", __base__=_SpaceBase, __module__=__name__, __doc__=_SpaceBase.__doc__,
                           **_range_fields())


class ObjectiveConfig(BaseModel):
    """One objective. Common keys are fields; type-specific keys are validated by the objective's class."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str
    name: str | None = None
    direction: Literal["maximize", "minimize"] | None = None
    data: Path | None = None
    test: Path | None = None
    limit: int | None = Field(default=None, ge=1)
    seed: int = 0
    batch_size: int = Field(default=32, ge=1)

    @property
    def label(self) -> str:
        """The objective's name in tables and in the study (defaults to its type)."""
        return self.name or self.type

    @property
    def options(self) -> dict[str, Any]:
        """The type-specific keys (everything not a common field)."""
        return dict(self.model_extra or {})


class FidelityConfig(_Frozen):
    """Fidelity rungs (see :mod:`mergesearch.search.fidelity`): score each objective on nested prefixes of its
    seeded subset and stop candidates early that a rung shows cannot reach the front."""

    #: examples per objective at each lower rung, increasing; the full subset (``limit``) is always the last stage.
    rungs: list[int] = Field(min_length=1)
    #: fraction of a rung's trials that go on to the next stage.
    keep: float = Field(default=1 / 3, gt=0.0, le=1.0)
    #: what promotion compares: the rung's scores (``none``), or ``regression``: each trial's full-subset score
    #: estimated from its rung's per-example values, by a regression fitted on the trials stored with theirs
    #: (examples weighed by what they tell about the full score; :func:`mergesearch.search.fidelity.fit_rung_model`).
    estimator: Literal["none", "regression"] = "none"

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v) or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"rungs must be positive and increasing, got {v}")
        return v


class SearchConfig(_Frozen):
    """The optimizer and the study's budget."""

    optimizer: str = "tpe"
    trials: int = Field(default=50, ge=1)
    seed: int = 0
    #: parameter dicts (or named presets such as ``uniform``) evaluated first.
    initial: list[str | dict[str, Any]] = Field(default_factory=list)
    #: the last ``refine`` trials of the budget polish the front (the ``initial`` recipes first) with small
    #: local moves instead of asking the optimizer; see :mod:`mergesearch.search.refine`.
    refine: int = Field(default=0, ge=0)
    #: unit-cube standard deviation of a refinement's first move (halved after each failed attempt).
    refine_step: float = Field(default=0.003, gt=0.0, le=0.5)
    #: hypervolume reference point per objective name (worst acceptable value); default: the base model's
    #: scores and, for costs, the worst expert's (see :mod:`mergesearch.search.baselines`).
    reference_point: dict[str, float] | None = None
    #: score the base, each expert and their uniform average once per study, as reference rows for the front
    #: and the hypervolume (costs len(models) + 2 evaluations, not counted as trials).
    baselines: bool = True
    #: backend-specific options (population size, batch size, ...).
    options: dict[str, Any] = Field(default_factory=dict)
    #: fidelity rungs; None: every trial is scored on every objective's whole subset.
    fidelity: FidelityConfig | None = None
    #: end the study once this many examples were scored (summed over trials, objectives and rungs).
    max_examples: int | None = Field(default=None, ge=1)


class ExecutionConfig(_Frozen):
    """Where trials run."""

    #: ``local`` evaluates in the driver process; ``ray`` on a pool of Ray actors.
    executor: Literal["local", "ray"] = "ray"
    workers: int = Field(default=1, ge=1)
    address: str | None = None
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    #: torch threads per worker (intra-op); 1 avoids oversubscription when workers share cores.
    threads: int = Field(default=1, ge=1)
    max_retries: int = Field(default=2, ge=0)
    #: Ray: trials sampled ahead and queued in the driver, each handed to the first worker that finishes its
    #: trial, before the driver has stored that result and sampled the next: workers do not wait for the driver
    #: (short trials, many workers). Each such trial is sampled knowing up to this many fewer results.
    prefetch: int = Field(default=0, ge=0)
    device: str = "cpu"
    #: keep task vectors in CPU memory (pinned) and stream them to ``device`` tensor by tensor while merging.
    offload_task_vectors: bool = False
    #: Ray: compute task vectors once in the driver; the workers of a node share one read-only object-store copy.
    share_task_vectors: bool = False


class JobConfig(_Frozen):
    """A whole search job."""

    base_model: str
    models: list[str] = Field(min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    objectives: list[ObjectiveConfig] = Field(min_length=1)
    search: SearchConfig = Field(default_factory=SearchConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    storage: str | None = None
    study: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _unique_names(self) -> JobConfig:
        names = [o.label for o in self.objectives]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"objective names must be unique; repeated: {', '.join(dup)}")
        return self


def _suggest(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    names = list(model.model_fields) + [f.alias for f in model.model_fields.values() if f.alias]
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (for 'did you mean' suggestions)."""
    model: type[BaseModel] | None = JobConfig
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        model = next((a for a in _members(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _members(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    out: list[Any] = []
    for a in args:
        out.extend(_members(a))
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the file, the key path and the problem of the first validation error."""
    errors = err.errors()
    # a misspelt key also shows up as a missing required one: name the misspelling, it is the cause
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    path = ".".join(str(p) for p in loc) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{path}'{_suggest(str(loc[-1]), _model_at(loc))}"
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    got = f" (got {value!r})" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    return f"{source}: {path}: {msg}{got}"


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file with the safe loader; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (bad byte at offset {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}:{where}: malformed YAML: {problem}") from None


def _resolve(value: str | None, root: Path) -> str | None:
    """A relative path resolved against the config's folder (whether it exists or not, so that an error about
    it names the place looked at); absolute paths unchanged."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


#: ``org/name``: what a hub id looks like (a relative path may too: it is a hub id only when no folder matches)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _resolve_model(value: str, root: Path, key: str) -> str:
    """A model reference: a folder relative to the config's folder (as data paths), an absolute folder, or a
    hub id, which a value is only when no local folder matches.

    Raises:
        ConfigError: the value names no folder next to the config but one relative to the working directory
            (which a config never means: it would depend on where the command is run); both places are named.
    """
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    here = (root / path).resolve()
    if here.exists():
        return str(here)
    cwd = path.resolve()
    if cwd.is_dir() and cwd != here:
        raise ConfigError(f"{key}: '{value}' is not a folder next to the config ({here}), only relative to the "
                          f"working directory ({cwd}); paths in a config are relative to its folder: fix the "
                          "path or make it absolute")
    is_hub_id = _HUB_ID.fullmatch(value) is not None and not value.startswith(".")
    return value if is_hub_id else str(here)


def load_config(path: str | Path) -> JobConfig:
    """Load and validate a job YAML.

    Args:
        path: the YAML file.

    Returns:
        The frozen config, with local model and data paths made absolute.

    Raises:
        ConfigError: on unreadable files, malformed YAML, unknown keys or invalid values.
    """
    p = Path(path)
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(p))) from None
    from mergesearch.objectives.registry import validate_objective

    for o in cfg.objectives:
        try:
            validate_objective(o)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    root = p.resolve().parent
    objectives = []
    for o in cfg.objectives:
        upd: dict[str, Any] = {}
        for key in ("data", "test"):
            v = getattr(o, key)
            if v is not None and not v.is_absolute():
                upd[key] = (root / v).resolve()
        # file-valued options (lm-eval task folders, python objectives given as path.py:function)
        extra = o.options
        if isinstance(extra.get("include_path"), str):
            upd["include_path"] = _resolve(extra["include_path"], root)
        target = extra.get("target")
        if isinstance(target, str) and ".py:" in target:
            file, _, fn = target.rpartition(":")
            upd["target"] = f"{_resolve(file, root)}:{fn}"
        objectives.append(o.model_copy(update=upd) if upd else o)
    space = cfg.space
    if space.align_data is not None and not space.align_data.is_absolute():
        space = space.model_copy(update={"align_data": (root / space.align_data).resolve()})
    if space.twin is not None and space.twin.fit_data:
        fit = {k: v if v.is_absolute() else (root / v).resolve() for k, v in space.twin.fit_data.items()}
        space = space.model_copy(update={"twin": space.twin.model_copy(update={"fit_data": fit})})
    try:
        base_model = _resolve_model(cfg.base_model, root, "base_model")
        models = [_resolve_model(m, root, f"models[{i}]") for i, m in enumerate(cfg.models)]
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return cfg.model_copy(update={"base_model": base_model, "models": models, "objectives": objectives,
                                  "space": space})
