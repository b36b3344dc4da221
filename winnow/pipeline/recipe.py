"""Recipes: YAML validated by pydantic.

A recipe names the data, the model, proxy training, scorers, the selector, the output and the
task runner. Unknown keys, wrong types and missing fields are refused with their dotted path
(`train.steps: Input should be a valid integer`). `--set a.b=c` overrides any key from the CLI;
the value is parsed as YAML (`--set train.seeds=[0,1]`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from winnow.errors import WinnowError
from winnow.pipeline.config import Strict
from winnow.pipeline.selection import SELECTORS, WEIGHTS

Task = Literal["causal_lm", "sequence_classification", "image_classification"]


class DataConfig(Strict):
    """Where the examples come from and which columns mean what."""

    source: str | dict[str, str] = Field(
        description="glob(s) of jsonl/json/parquet/csv files (comma-separated), a `save_to_disk` folder, or a "
        "hub dataset id; or one source per domain, {domain: source}, whose rows get that domain"
    )
    format: Literal["auto", "json", "parquet", "csv", "disk", "hub"] = "auto"
    split: str = "train"
    id_column: str | None = None
    text_column: str | None = None
    input_ids_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    domain_column: str | None = None
    label_names: list[str] | None = Field(
        default=None, description="names of the classes in index order, for string labels"
    )
    image_shape: list[int] | None = Field(
        default=None, description="(C, H, W) to reshape flat pixel arrays into"
    )
    pixel_scale: float = Field(default=1.0, description="pixels are multiplied by this")
    read_batch_size: int = Field(default=512, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _per_domain_sources(cls, v: Any) -> Any:
        """``source: {domain: source}``: each source's rows get its domain, written into the column
        ``domain_column`` (default ``domain``; a column of that name in the files is overwritten)."""
        if isinstance(v, dict) and isinstance(v.get("source"), dict):
            src = v["source"]
            if not src:
                raise ValueError(
                    "data.source: an empty mapping; give {domain: source} with at least one domain"
                )
            for name, where in src.items():
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"data.source: domain names must be non-empty strings, got {name!r}")
                if not isinstance(where, str) or not where.strip():
                    raise ValueError(f"data.source.{name}: expected a glob, folder or hub id, got {where!r}")
            if v.get("domain_column") is None:
                v = {**v, "domain_column": "domain"}
        return v


class TokenizerTrain(Strict):
    kind: Literal["bpe"] = "bpe"
    vocab_size: int = Field(default=4096, ge=64)
    min_frequency: int = Field(default=2, ge=1)
    max_rows: int = Field(default=50_000, gt=0, description="rows of the data to train on")
    refit: Literal["inputs", "never"] = Field(
        default="inputs",
        description="inputs: train again when the input files change; never: keep the tokenizer the run "
        "folder trained first (periodic rescoring: new rows are scored, old ones read from the cache)",
    )


class TokenizerConfig(Strict):
    path: str | None = Field(default=None, description="folder of a saved tokenizer; default: model.path")
    train: TokenizerTrain | None = None


class ModelConfig(Strict):
    task: Task
    path: str | None = Field(default=None, description="local folder with config.json and weights")
    config: dict[str, Any] | None = Field(
        default=None, description="a transformers config (with model_type) for a random init"
    )
    tokenizer: TokenizerConfig = TokenizerConfig()
    max_length: int = Field(default=256, gt=1)
    num_labels: int | None = Field(default=None, gt=0)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of model.path (a local folder) or model.config (random init)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs a model_type (e.g. gpt2, llama, bert, vit)")
        return self


SdpaBackends = list[Literal["flash", "efficient", "cudnn", "math"]] | Literal["auto", "torch"]
"""train.sdpa_backends, scoring.sdpa_backends: the kernels torch's scaled_dot_product_attention may pick
(winnow.pipeline.scoring.sdpa_backends)."""


class TrainConfig(Strict):
    """Proxy training: the "early in training" models that EL2N, GraNd and influence need."""

    steps: int = Field(default=200, ge=0)
    batch_size: int = Field(default=16, gt=0)
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    checkpoints: list[int] | None = Field(default=None, description="steps to save (default: the last step)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sdpa_backends: SdpaBackends = Field(
        default="auto",
        min_length=1,
        description="the attention kernels torch's scaled_dot_product_attention may pick while the proxy "
        "trains, as scoring.sdpa_backends: auto leaves cuDNN out on CUDA (its forward and backward plans are "
        "built for every new batch length); not part of the training's fingerprint",
    )
    refit: Literal["inputs", "never"] = Field(
        default="inputs",
        description="inputs: train the proxy again when the input files change; never: keep the proxy the "
        "run folder trained first (periodic rescoring: new rows are scored, old ones read from the cache)",
    )

    @model_validator(mode="after")
    def _checkpoints(self) -> TrainConfig:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"train.seeds has repeated seeds: {self.seeds}")
        for c in self.checkpoints or []:
            if not 0 <= c <= self.steps:
                raise ValueError(f"train.checkpoints: step {c} is outside 0..train.steps ({self.steps})")
        return self

    def checkpoint_steps(self) -> list[int]:
        return sorted(set(self.checkpoints or [self.steps]))


class ScorerSpec(Strict):
    """One scorer of the registry (``winnow.scorers.SCORERS``) and its parameters, each checked against the
    scorer's declared ``PARAMS`` (name, type, range, choices) when the recipe is read, so a misspelt or
    out-of-range parameter stops ``winnow validate`` and ``winnow run`` before anything trains."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from winnow.scorers import SCORERS

        if v not in SCORERS:
            raise ValueError(f"unknown scorer {v!r}; known: {', '.join(sorted(SCORERS))}")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        from winnow.scorers import SCORERS

        name = info.data.get("name")
        if name in SCORERS:  # an unknown name is reported by its own validator
            SCORERS[name](**v)  # raises a one-line ValueError naming the parameter and what it expects
        return v


class EmbeddingsConfig(Strict):
    """Vectors for diversity selection (select.method: dpp): a local encoder's mean-pooled hidden
    states (`model`: a folder, or `minilm` for the packaged all-MiniLM-L6-v2), or a vector column."""

    model: str | None = None
    column: str | None = None
    gradient: bool = Field(
        default=False,
        description="projected per-example gradients of the last proxy checkpoint (the gradient engine)",
    )
    proj_dim: int = Field(default=1024, gt=0, description="gradient: dimensions of the projection")
    parameters: str = Field(default="all", description="gradient: all | last_layer | lora | names")
    proj_seed: int = 0
    proj_kind: Literal["kfjlt", "tensor_sketch", "rademacher", "gaussian"] = "kfjlt"
    max_length: int = Field(default=256, gt=1)
    batch_size: int = Field(default=64, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> EmbeddingsConfig:
        if sum([self.model is not None, self.column is not None, self.gradient]) != 1:
            raise ValueError(
                "give exactly one of scoring.embeddings.model (an encoder folder or 'minilm'), "
                "scoring.embeddings.column (a vector column) or scoring.embeddings.gradient: true"
            )
        return self


class InfluenceConfig(Strict):
    """Influence (LESS / TracIn) and gradient similarity against a target set (pipeline/influence.py)."""

    target: str = Field(description="glob(s) of the target examples, read with data's format and columns")
    subtask_column: str | None = Field(
        default=None,
        description="target column naming subtasks: a training "
        "example's influence is the max over subtasks of its mean over each",
    )
    proj_dim: int = Field(default=8192, gt=0, description="dimensions of the projected gradient features")
    proj_seed: int = Field(default=0, description="seed of the projection (same features in every process)")
    proj_kind: Literal["kfjlt", "tensor_sketch", "rademacher", "gaussian"] = Field(
        default="kfjlt",
        description="kfjlt: rotated and folded, as accurate as a dense Gaussian map at the same k and the "
        "fastest of the accurate maps; tensor_sketch: the earlier default, as accurate, slower on GPUs; "
        "rademacher / gaussian: the Kronecker-structured maps, fastest, noisier (winnow/grads/projection.py)",
    )
    parameters: str = Field(default="all", description="all | last_layer | lora | comma-separated names")
    precondition: Literal["less", "adam", "none"] = Field(
        default="less",
        description="less: training examples' Adam update direction, target examples' plain gradients (LESS "
        "and its code); adam: both sides scaled by the second moments (rank-one for matrices); none: plain",
    )
    checkpoints: Literal["all", "last"] = Field(
        default="all", description="the first seed's checkpoints above step 0, or only its last"
    )
    neighbours: int = Field(default=10, ge=0, description="top training examples kept per target example")
    batch_size: int = Field(default=16, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ScoringConfig(Strict):
    scorers: list[ScorerSpec] = Field(default_factory=lambda: [ScorerSpec(name="el2n")], min_length=1)
    batch_size: int = Field(default=32, gt=0)
    batch_tokens: int | Literal["auto"] = Field(
        default="auto",
        description="a batch as many length-sorted rows as fit this many padded tokens (rows x longest), "
        "batch_size ignored; 0: batch_size rows a batch. A batch's host cost (kernel launches, Python) is "
        "the same for 30 rows as for 150, so short rows go in larger batches; auto: 16384 on CUDA for "
        "scorers that need no gradient, 0 otherwise",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(default=False, description="torch.compile the model's body (GPU only)")
    loader_workers: int | Literal["auto"] = Field(
        default="auto",
        description="workers (processes or threads, see loader) that tokenize and key read batches ahead "
        "of the model (0: inline); auto: min(8, cores / 2) on CUDA, 0 on CPU",
    )
    loader: Literal["auto", "threads", "processes"] = Field(
        default="auto",
        description="what the loader workers are: threads (start at once, but share the interpreter lock "
        "with the thread that launches the model's kernels) or processes (started once a run, from a "
        "forkserver, ~8 s; they share no lock with it); auto: processes on CUDA, threads elsewhere; "
        "winnow/pipeline/feed.py",
    )
    bucket_rows: int | Literal["auto"] = Field(
        default="auto",
        description="rows length-sorted together into batches (more rows, less padding); "
        "auto: 8192 on CUDA, data.read_batch_size on CPU",
    )
    pad_multiple: int = Field(
        default=1,
        ge=1,
        description="a batch's length padded up to a multiple of this: fewer distinct shapes for the GPU "
        "libraries' per-shape plans and for compile, at the price of scoring the padding",
    )
    sdpa_backends: SdpaBackends = Field(
        default="auto",
        min_length=1,
        description="the attention kernels torch's scaled_dot_product_attention may pick while scoring; "
        "auto: flash, efficient and math on CUDA (no cuDNN: its per-thread, per-shape plans cost 50-100 "
        "ms for every new batch shape), torch's own choice on CPU; torch: torch's own choice everywhere",
    )
    embeddings: EmbeddingsConfig | None = None
    influence: InfluenceConfig | None = None

    @field_validator("loader_workers", "bucket_rows", "batch_tokens")
    @classmethod
    def _non_negative(cls, v: Any, info: Any) -> Any:
        least = 0 if info.field_name in ("loader_workers", "batch_tokens") else 1
        if isinstance(v, int) and v < least:
            raise ValueError(f"scoring.{info.field_name} must be 'auto' or an integer >= {least}, got {v}")
        return v

    @field_validator("scorers", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": s} if isinstance(s, str) else s for s in v]
        return v


# the registered choices, in registration order (what the recipe's Literal types offer)
_SELECTORS = tuple(SELECTORS)
_WEIGHT_METHODS = tuple(WEIGHTS)
WEIGHT_OPTIONS = ("temperature", "clip_min", "clip_max", "invert", "delta", "range_quantile", "per_stratum")


class WeightConfig(Strict):
    """Score-to-weight transforms (winnow.selectors.score_to_weight), and the loss-to-weight
    strategies of Sow et al. 2025 (winnow.selectors.loss_to_weight: linupper, quadratic, extremes)
    for a loss column, with `temperature` as their r. ``method`` names a registered weight method
    (``winnow.pipeline.selection.WEIGHTS``), which says which of the options below it takes."""

    method: Literal[_WEIGHT_METHODS] = Field(default="uniform", description="a registered weight method")
    score: str | None = Field(default=None, description="score column; default: select.score")
    temperature: float = Field(default=1.0, gt=0)
    clip_min: float | None = Field(default=None, ge=0)
    clip_max: float | None = Field(default=None, gt=0)
    invert: bool = False
    delta: float = Field(
        default=1.0, gt=0, description="loss strategies: losses are normalised to [-delta, delta]"
    )
    range_quantile: float = Field(
        default=0.0, ge=0, lt=0.5, description="loss strategies: normalise by these quantiles, not min/max"
    )
    per_stratum: bool = Field(
        default=False, description="loss strategies: normalise within each select.stratify group"
    )

    @model_validator(mode="after")
    def _options_fit_method(self) -> WeightConfig:
        from winnow.pipeline.selection import WEIGHTS

        wm = WEIGHTS[self.method]
        for key in WEIGHT_OPTIONS:
            if key not in wm.options and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(
                    f"select.weights.{key} does not apply to the {wm.family} {self.method!r} "
                    f"(it takes {', '.join(wm.options)})"
                )
        return self


class SelectBase(Strict):
    """The ``select`` section: a registered selector (``method``; ``winnow.pipeline.selection.SELECTORS``),
    its budget, strata and weights. Selectors with options of their own add a sub-section (``select.dpp``):
    :data:`SelectConfig` is this model with those sections added from the registry."""

    method: Literal[_SELECTORS] = Field(default="score", description="a registered selector")
    score: str = "el2n"
    fraction: float | None = Field(default=None, description="keep this fraction, in (0, 1]")
    count: int | None = Field(default=None, ge=0)
    threshold: float | None = None
    keep: Literal["highest", "lowest", "band"] = "highest"
    offset: float = Field(default=0.0, ge=0, lt=1, description="band: fraction of the top tail to skip")
    stratify: Literal["domain", "label"] | None = None
    seed: int = 0
    weights: WeightConfig = WeightConfig()

    @field_validator("fraction")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> SelectBase:
        from winnow.pipeline.selection import SELECTORS

        s = SELECTORS[self.method]
        if not s.stratify and self.stratify is not None:
            raise ValueError(f"select.method {self.method} does not stratify (yet): remove select.stratify")
        if not s.budgets:  # keeps every row
            return self
        given = [k for k in ("fraction", "count", "threshold") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of select.fraction, select.count, select.threshold "
                f"(got {', '.join(given) or 'none'})"
            )
        if given[0] not in s.budgets:
            raise ValueError(
                f"select.method {self.method} takes a {' or a '.join(s.budgets)}, not a {given[0]}"
            )
        return self


def _select_config() -> Any:
    from pydantic import create_model

    from winnow.pipeline.selection import SELECTORS

    sections = {s.options[0]: (s.options[1], s.options[1]()) for s in SELECTORS.values() if s.options}
    return create_model("SelectConfig", __base__=SelectBase, __module__=__name__, **sections)


SelectConfig = _select_config()


def _mixture_config() -> Any:
    """The ``mixture`` section: the discriminated union (on ``method``) of the registered methods' configs
    (``winnow.pipeline.mixtures``: one file per method, each with its own options)."""
    from winnow.pipeline.mixtures import MIXTURE_METHODS

    configs = tuple(m.config for m in MIXTURE_METHODS.values())
    return Annotated[Union[configs], Field(discriminator="method")]  # noqa: UP007


MixtureConfig = _mixture_config()


class OutputConfig(Strict):
    dir: str | None = Field(default=None, description="run folder; default runs/<name>")
    shard_max_rows: int = Field(default=100_000, gt=0)
    shard_max_bytes: int = Field(default=256 * 2**20, gt=0)
    include_pruned: bool = Field(default=False, description="also write pruned rows, with weight 0")
    score_columns: list[str] = Field(default_factory=list, description="score columns copied into shards")


class RunnerConfig(Strict):
    kind: Literal["thread", "ray"] = "thread"
    max_workers: int = Field(default=2, gt=0)
    tasks_per_gpu: int = Field(
        default=1,
        gt=0,
        description="tasks of one process that use a GPU at once (scoring, training, features, embeddings, "
        "mixture); more wait for a slot while CPU steps run beside them",
    )
    ray_address: str | None = Field(default=None, description="ray address; default: start a local Ray")
    torch_threads: int | None = Field(default=None, gt=0, description="torch threads per task")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    scoring: ScoringConfig = ScoringConfig()
    select: SelectConfig
    output: OutputConfig = OutputConfig()
    runner: RunnerConfig = RunnerConfig()
    mixture: MixtureConfig | None = None

    @model_validator(mode="after")
    def _columns_for_task(self) -> Recipe:
        d, task = self.data, self.model.task
        if task == "image_classification":
            if d.image_column is None:
                raise ValueError("data.image_column is required for image_classification")
        elif d.input_ids_column is None and d.text_column is None:
            d.text_column = "text"
        if task != "causal_lm" and d.label_column is None:
            raise ValueError(f"data.label_column is required for {task}")
        if self.model.tokenizer.train is not None and d.text_column is None:
            raise ValueError("model.tokenizer.train needs text: set data.text_column")
        if self.select.stratify == "domain" and d.domain_column is None:
            raise ValueError(
                "select.stratify is 'domain' but the data has no domains (set data.domain_column, or "
                "give data.source as {domain: source})"
            )
        if self.select.weights.per_stratum and self.select.stratify is None:
            raise ValueError("select.weights.per_stratum needs select.stratify")
        if self.select.stratify == "label" and d.label_column is None:
            raise ValueError("select.stratify is 'label' but data.label_column is not set")
        if self.mixture is not None and d.domain_column is None:
            raise ValueError(
                "mixture needs domains: data.domain_column, or one source per domain "
                "(data.source: {domain: source})"
            )
        if (
            self.scoring.embeddings is not None
            and self.scoring.embeddings.model is not None
            and d.text_column is None
        ):
            raise ValueError("scoring.embeddings.model embeds text: set data.text_column")
        from winnow.scorers import SCORERS

        for i, spec in enumerate(self.scoring.scorers):
            if task not in SCORERS[spec.name].tasks:
                raise ValueError(
                    f"scoring.scorers.{i}: scorer {spec.name!r} does not support model.task {task!r} "
                    f"(it supports {', '.join(sorted(SCORERS[spec.name].tasks))})"
                )
        from winnow.pipeline.selection import SELECTORS, WEIGHTS

        selector, w = SELECTORS[self.select.method], self.select.weights
        problem = selector.check(self)
        if problem:
            raise ValueError(problem)
        if (
            WEIGHTS[w.method].needs_score
            and (w.score or (self.select.score if selector.name == "score" else None)) is None
        ):
            raise ValueError(f"select.weights.method {w.method!r} needs a score: set select.weights.score")
        score_names = self.score_columns()
        for key, col in [
            *selector.scores(self.select),
            ("select.weights.score", self.select.weights.score),
        ] + [("output.score_columns", c) for c in self.output.score_columns]:
            if col is not None and col not in score_names:
                raise ValueError(
                    f"{key}: {col!r} is not a score this recipe computes ({', '.join(score_names)})"
                )
        return self

    def score_columns(self) -> list[str]:
        from winnow.scorers import SCORERS

        cols: list[str] = []
        for s in self.scoring.scorers:
            cls = SCORERS[s.name]
            cols.extend(getattr(cls, "columns", None) or [s.name])
        if self.scoring.influence is not None:
            cols.extend(["influence", "self_influence", "gradsim_target", "gradsim_domain"])
        return cols

    def run_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}").expanduser()


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise WinnowError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise WinnowError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise WinnowError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from None
        out.append((key.strip(), value))
    return out


def format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "missing required key"
        lines.append(f"{loc}: {msg}")
    return f"{where}: " + "; ".join(lines)


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise WinnowError(format_validation_error(e, where)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise WinnowError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise WinnowError(f"{where}: not valid YAML: {what}" + (f" ({context})" if context else "")) from None
    if not isinstance(raw, dict):
        raise WinnowError(f"{path}: expected a mapping of sections (name, data, model, ...)")
    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    recipe = recipe_from_dict(raw, str(path))
    # Relative data and model paths are relative to the working directory, as on the CLI.
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
