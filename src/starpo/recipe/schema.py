"""The recipe's typed schema. Every stage kind is one class here; what the rest of starpo
needs to know about a kind (whether its model is a policy, whether it starts from a model,
which of its fields name other stages) is declared on the class, once."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from starpo import judge_kinds, losses, pair_rules
from starpo.errors import RecipeError
from starpo.recipe import graph


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data

class SourceSpec(Strict):
    """One data source of a mixture.

    ``path`` is a hub dataset id (``HuggingFaceH4/ultrafeedback_binarized``), a local
    ``.jsonl``/``.json``/``.parquet`` file or directory, or the embedded world
    (``world:sft``, ``world:preference``, ``world:eval``).
    """

    path: str
    format: str = "auto"          # schema name (see starpo.data.sources.FORMATS) or auto-detect
    split: str = "train"
    config_name: str | None = None  # hub dataset configuration (`name=` of load_dataset)
    data_dir: str | None = None     # hub dataset sub-directory (hh-rlhf: harmless-base, …)
    fraction: float = Field(1.0, gt=0.0, le=1.0)  # share of this source's rows to keep
    n: int | None = Field(None, gt=0)             # cap on rows taken (after fraction)
    safety_filter: bool = True   # PKU-SafeRLHF: keep pairs where exactly one response is safe
    # sft stages: train on prompt + chosen of preference data; left out of dumps when unset so
    # recipes that do not use it keep their stage hashes and prepared-data keys
    use: Literal["chosen"] | None = Field(None, exclude_if=lambda v: v is None)


class DataSpec(Strict):
    sources: list[SourceSpec]
    dedup: bool = True
    shuffle: bool = True
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # held-out share for eval loss/accuracy
    on_bad_rows: Literal["skip", "error"] = "error"


# --------------------------------------------------------------------------- model

class TinyModelSpec(Strict):
    """The default tiny Llama, built from a config with a tokenizer trained on the world."""

    vocab_size: int = Field(1024, ge=300)
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 6
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True


class ModelSpec(Strict):
    # "tiny", a hub id, a local checkpoint directory, or a GGUF checkpoint (a .gguf file, or
    # a directory plus gguf_file; needs the gguf extra)
    name_or_path: str = "tiny"
    # the .gguf file inside the name_or_path directory (left out of dumps when unset, so
    # stage hashes of recipes without it stay the same)
    gguf_file: str | None = Field(None, exclude_if=lambda v: v is None)
    tiny: TinyModelSpec = TinyModelSpec()
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = "sdpa"
    # sdpa/eager: attention of packed rows per document (starpo.model.attention); false = the
    # kernel over whole rows with a block mask (slower, for comparison)
    segment_attention: bool = True
    # which kernel keeps packed documents (and prefix-shared pairs) apart, for sdpa/eager
    # models and the prefix-shared rows of flash-attention models: auto = torch's
    # flash-attention varlen on CUDA (one call per layer; flex where torch lacks it), the
    # per-document loop on CPU (fastest there); a kernel the device does not offer falls
    # back to auto. Each training stage logs which one runs. (Left out of dumps when auto,
    # so stage hashes of runs made before the field existed stay the same.)
    packed_attention: Literal["auto", "segments", "varlen", "flex"] = Field(
        "auto", exclude_if=lambda v: v == "auto")
    trust_remote_code: bool = False
    chat_template: str | None = None   # override; ChatML is used when the tokenizer has none
    lora: dict[str, Any] | None = None  # peft LoraConfig kwargs; None = full fine-tuning


# --------------------------------------------------------------------------- training

class TrainSpec(Strict):
    lr: float = Field(1e-3, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs
    batch_size: int = Field(8, gt=0)           # sequences (SFT rows) or pairs per micro-batch
    grad_accum: int = Field(1, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    # torch.compile each repeated block (regional) for the loop and the reference pass;
    # measured not to pay off on the quickstart's CPU runs: docs/performance.md (left out
    # of dumps when off, so stage hashes of runs made before the field existed stay the same)
    compile: bool = Field(False, exclude_if=lambda v: not v)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0)  # checkpoint every N steps (None = at end only)
    keep_checkpoints: int = Field(1, ge=1)  # newest kept; at least 2 (a damaged newest falls back)
    logprob_chunk_size: int = Field(1024, gt=0)  # tokens per chunk of the lm-head log-softmax


class PackingSpec(Strict):
    """SFT batching: the LIONs paper's four variants plus concatenate-and-cut."""

    mode: Literal["pack", "pad", "concat"] = "pack"  # concat = LIONs' concatenate-and-cut
    loss_masking: bool = True      # train on assistant tokens only
    max_length: int = Field(512, gt=8)
    drop_masked_ratio: float = Field(0.9, gt=0, le=1.0)  # concat: drop rows with >90% masked


class StageBase(Strict):
    # what the pipeline, evaluation and sweeps know of a kind (declared once, per class):
    yields_policy: ClassVar[bool] = True     # its model/ is a causal-LM policy
    starts_from_model: ClassVar[bool] = True  # trains a model given by `model`
    refs: ClassVar[tuple[str, ...]] = ("model",)  # fields that may name another stage
    evaluates: ClassVar[bool] = False         # samples and scores models (writes summary.json)
    sft_baseline: ClassVar[bool] = False      # the first such stage is evaluation's SFT reference
    # (what these mean for a recipe, resolved: starpo.recipe.graph)

    name: str | None = None
    model: str | None = None        # starting point: a stage name or a path (default: previous)
    data: DataSpec
    train: TrainSpec = TrainSpec()
    seed: int | None = None


class SFTStage(StageBase):
    sft_baseline: ClassVar[bool] = True
    type: Literal["sft"]
    packing: PackingSpec = PackingSpec()


class PreferenceSpec(Strict):
    """Shared by the offline (dpo) and online stages."""

    # a name of starpo.losses' registry, or an importable module:function
    loss: str = "dpo"
    beta: float = Field(0.1, gt=0)
    gamma: float = Field(0.5, ge=0)        # SimPO target margin
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    max_length: int = Field(512, gt=8)
    max_prompt_length: int = Field(256, gt=0)
    padding_free: bool = True
    prefix_sharing: bool = True
    reference: str | None = None            # stage name or path; default: the starting model
    reference_cache: bool = True

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        try:
            return losses.check_name(v)
        except RecipeError as err:
            raise ValueError(str(err)) from None

    @model_validator(mode="after")
    def _smoothing(self):
        if self.label_smoothing and not losses.get(self.loss).takes_label_smoothing:
            raise ValueError(f"label_smoothing: not defined for the {self.loss} loss")
        return self


class DPOStage(StageBase, PreferenceSpec):
    refs: ClassVar[tuple[str, ...]] = ("model", "reference")
    type: Literal["dpo"]


class GenerationSpec(Strict):
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)          # rows per forward (hf backend)
    # hf: transformers generate on the model in memory; vllm: the saved checkpoint in vLLM
    # (GPU, the [vllm] extra), same sampling semantics (starpo.generate.vllm)
    # (defaults are left out of dumps, so the stage hashes and sample-cache keys of runs
    # made before these fields existed stay the same)
    backend: Literal["hf", "vllm"] = Field("hf", exclude_if=lambda v: v == "hf")
    # vllm only: the share of GPU memory vLLM may take while it samples (it is released
    # before training goes on)
    gpu_memory_utilization: float = Field(0.5, gt=0, lt=1, exclude_if=lambda v: v == 0.5)
    # hf only: the decoding loop (starpo.generate.static). "generate": transformers'
    # generate, its KV cache grown token by token; "static": starpo's loop over a KV cache
    # allocated once, sampling on the device; "graph": "static" with its one-token decode
    # step captured once as a CUDA graph and replayed (CUDA only; elsewhere, or for a model
    # it cannot capture, it runs as "static" and the log says why); "auto": "graph" on CUDA,
    # "generate" elsewhere. The same seed gives the same samples with each, up to float
    # round-off of the logits.
    decoder: Literal["auto", "generate", "static", "graph"] = Field(
        "auto", exclude_if=lambda v: v == "auto")
    # hf static/graph decoders only: rows (prompt × sample) decoded together; "auto": as
    # many as half of the free GPU memory holds by an estimate (at most 256; halved and
    # retried if the GPU still runs out), batch_size off the GPU
    decode_batch_size: int | Literal["auto"] = Field(
        "auto", exclude_if=lambda v: v == "auto")

    @field_validator("decode_batch_size")
    @classmethod
    def _positive_rows(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("decode_batch_size must be a positive number of rows or auto")
        return v


class JudgeSpec(Strict):
    # a built-in judge (starpo.judge_kinds), or an importable module:Class
    type: str = "reward_model"
    path: str | None = None          # stage name or checkpoint for reward_model / pairwise
    input_format: Literal["chat_template", "openassistant"] = "chat_template"
    batch_size: int = Field(16, gt=0)
    options: dict[str, Any] = {}     # keyword arguments of a module:Class judge

    @field_validator("type")
    @classmethod
    def _known_judge(cls, v: str) -> str:
        try:
            return judge_kinds.check_name(v)
        except RecipeError as err:
            raise ValueError(str(err)) from None


class OnlineStage(StageBase, PreferenceSpec):
    refs: ClassVar[tuple[str, ...]] = ("model", "reference", "judge.path")
    type: Literal["online"]
    rounds: int = Field(1, gt=0)
    n_samples: int = Field(4, ge=2)
    prompts_per_round: int | None = Field(None, gt=0)
    generation: GenerationSpec = GenerationSpec()
    judge: JudgeSpec = JudgeSpec()
    # which samples of a prompt become its pair(s): best_worst · best_random ·
    # mean_minus_2sd · random, or an importable module:function (starpo.pair_rules)
    pair_selection: str = "best_worst"
    reference_mode: Literal["round_start", "fixed"] = "round_start"

    @field_validator("pair_selection")
    @classmethod
    def _known_rule(cls, v: str) -> str:
        try:
            return pair_rules.check_name(v)
        except RecipeError as err:
            raise ValueError(str(err)) from None


class RewardStage(StageBase):
    yields_policy: ClassVar[bool] = False     # a sequence classifier, not a policy
    type: Literal["reward"]
    max_length: int = Field(512, gt=8)
    max_prompt_length: int = Field(256, gt=0)


class PairwiseRMStage(StageBase):
    """A pairwise preference model (PairRM-like) on the starting model's body: reads the
    prompt and both responses at once (starpo.stages.pairwise_rm); a judge, not a policy."""

    yields_policy: ClassVar[bool] = False     # a sequence classifier, not a policy
    type: Literal["pairwise_rm"]
    max_length: int = Field(512, gt=8)        # prompt + both responses
    max_prompt_length: int = Field(256, gt=0)


def _default_eval_data() -> DataSpec:
    return DataSpec(sources=[SourceSpec(path="world:eval", n=200)], shuffle=False)


class EvalStage(Strict):
    yields_policy: ClassVar[bool] = False
    starts_from_model: ClassVar[bool] = False
    refs: ClassVar[tuple[str, ...]] = ("judge.path", "models", "sft")
    evaluates: ClassVar[bool] = True
    sft_baseline: ClassVar[bool] = False
    type: Literal["eval"]
    name: str | None = None
    data: DataSpec = Field(default_factory=_default_eval_data)
    models: list[str] | None = None   # default: every trained stage of the run
    sft: str | None = None            # reference for win_vs_sft / kl_vs_sft (default: the sft stage)
    judge: JudgeSpec = JudgeSpec(type="gold")
    generation: GenerationSpec = GenerationSpec(temperature=0.7, top_p=0.9, max_new_tokens=256)

    bootstrap: int = Field(1000, ge=0)
    seed: int | None = None

    @model_validator(mode="after")
    def _pointwise(self) -> "EvalStage":
        if not judge_kinds.is_pointwise(self.judge.type):
            raise ValueError(f"judge.type: the eval stage needs a pointwise judge (one that "
                             f"scores each response); {self.judge.type} only compares pairs")
        return self


# every stage kind, in the order the README lists them; the stage registry
# (starpo.stages) gives each its runner
STAGE_SPECS = (SFTStage, DPOStage, RewardStage, PairwiseRMStage, OnlineStage, EvalStage)
STAGE_TYPES: dict[str, type] = {cls.model_fields["type"].annotation.__args__[0]: cls
                                for cls in STAGE_SPECS}

Stage = Annotated[Union[STAGE_SPECS], Field(discriminator="type")]


def stage_spec(type_name: str) -> type:
    """The spec class of a stage kind (its traits: ``yields_policy``, ``refs`` …)."""
    try:
        return STAGE_TYPES[type_name]
    except KeyError:
        raise RecipeError(f"unknown stage type {type_name!r}; expected one of "
                          f"{', '.join(STAGE_TYPES)}") from None


Tracker = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS = get_args(Tracker)


class LoggingSpec(Strict):
    """The recipe's ``logging`` section: experiment trackers (:mod:`starpo.train.trackers`)."""

    trackers: list[Tracker] = ["tensorboard"]
    run_per: Literal["stage", "pipeline"] = "stage"
    project: str | None = None
    mlflow_tracking_uri: str | None = None
    init_kwargs: dict[Tracker, dict[str, Any]] = Field(
        default_factory=dict)

    @field_validator("trackers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        return v


def is_default(spec: LoggingSpec) -> bool:
    """True for the default section (left out of recipe dumps, so hashes stay as they were)."""
    return spec == LoggingSpec()


class WorldSpec(Strict):
    seed: int = 0


class Recipe(Strict):
    name: str | None = None
    seed: int = 0
    model: ModelSpec = ModelSpec()
    world: WorldSpec = WorldSpec()
    stages: list[Stage]
    # experiment trackers (starpo.train.trackers); left out of dumps when default (stable hashes)
    logging: LoggingSpec = Field(default_factory=LoggingSpec, exclude_if=is_default)

    @model_validator(mode="after")
    def _names(self) -> "Recipe":
        seen = set()
        for i, st in enumerate(self.stages):
            if st.name is None:
                st.name = st.type
            if st.name in seen:
                raise ValueError(f"stages.{i}.name: duplicate stage name {st.name!r}")
            seen.add(st.name)
        return self

    @model_validator(mode="after")
    def _judge_stages(self) -> "Recipe":
        """A judge that loads a stage kind's model (pairwise_rm) names such a stage, earlier."""
        order = {st.name: i for i, st in enumerate(self.stages)}
        for i, st in enumerate(self.stages):
            spec = getattr(st, "judge", None)
            kind = judge_kinds.stage_kind(spec.type) if spec is not None else None
            if kind is None:
                continue
            where = f"stages.{st.name}.judge.path"
            if not spec.path:
                raise ValueError(f"{where}: a {spec.type} judge needs path: the name of a "
                                 f"{kind} stage (or that stage's model/ directory)")
            if spec.path not in order:
                continue                      # a directory, checked when the judge loads
            target = self.stages[order[spec.path]]
            if target.type != kind:
                raise ValueError(f"{where}: {spec.path!r} is a {target.type} stage; a "
                                 f"{spec.type} judge needs a {kind} stage")
            if order[spec.path] >= i:
                raise ValueError(f"{where}: stage {spec.path!r} comes after {st.name!r}; "
                                 f"put the {kind} stage before the stage it judges")
        return self

    @model_validator(mode="after")
    def _links(self) -> "Recipe":
        """Every field naming another stage names an earlier one (starpo.recipe.graph)."""
        found = graph.problems(self)
        if found:
            raise ValueError(found[0])
        return self

    def stage(self, name: str):
        for st in self.stages:
            if st.name == name:
                return st
        raise RecipeError(f"no stage named {name!r}; stages are {[s.name for s in self.stages]}")
