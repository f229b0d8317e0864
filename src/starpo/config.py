"""The recipe: a YAML file validated into typed objects.

Unknown keys and wrong types fail with the key's dotted path (``stages.1.train.lr``).
Command-line overrides ``key.path=value`` are applied to the raw YAML tree before
validation, so they are checked exactly like keys written in the file. List items are
addressed by index or, for stages, by name: ``stages.dpo.beta=0.3``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from starpo.errors import RecipeError
from starpo.trackers import LoggingSpec, is_default


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
    name_or_path: str = "tiny"     # "tiny", a hub id or a local checkpoint directory
    tiny: TinyModelSpec = TinyModelSpec()
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = "sdpa"
    # sdpa/eager: attention of packed rows per document (starpo.attention); false = the
    # kernel over whole rows with a block mask (slower, for comparison)
    segment_attention: bool = True
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
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto = bf16 on GPU
    log_every: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0)  # checkpoint every N steps (None = at end only)
    keep_checkpoints: int = Field(1, ge=1)
    logprob_chunk_size: int = Field(1024, gt=0)  # tokens per chunk of the lm-head log-softmax


class PackingSpec(Strict):
    """SFT batching: the LIONs paper's four variants plus concatenate-and-cut."""

    mode: Literal["pack", "pad", "concat"] = "pack"  # concat = LIONs' concatenate-and-cut
    loss_masking: bool = True      # train on assistant tokens only
    max_length: int = Field(512, gt=8)
    drop_masked_ratio: float = Field(0.9, gt=0, le=1.0)  # concat: drop rows with >90% masked


class StageBase(Strict):
    name: str | None = None
    model: str | None = None        # starting point: a stage name or a path (default: previous)
    data: DataSpec
    train: TrainSpec = TrainSpec()
    seed: int | None = None


class SFTStage(StageBase):
    type: Literal["sft"]
    packing: PackingSpec = PackingSpec()


class PreferenceSpec(Strict):
    """Shared by the offline (dpo) and online stages."""

    loss: Literal["dpo", "ln_dpo", "simpo", "ipo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    gamma: float = Field(0.5, ge=0)        # SimPO target margin
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    max_length: int = Field(512, gt=8)
    max_prompt_length: int = Field(256, gt=0)
    padding_free: bool = True
    prefix_sharing: bool = True
    reference: str | None = None            # stage name or path; default: the starting model
    reference_cache: bool = True

    @model_validator(mode="after")
    def _ipo_smoothing(self):
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing: not defined for the ipo loss")
        return self


class DPOStage(StageBase, PreferenceSpec):
    type: Literal["dpo"]


class GenerationSpec(Strict):
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)


class JudgeSpec(Strict):
    type: Literal["reward_model", "pairwise", "gold"] = "reward_model"
    path: str | None = None          # stage name or checkpoint for reward_model / pairwise
    input_format: Literal["chat_template", "openassistant"] = "chat_template"
    batch_size: int = Field(16, gt=0)


class OnlineStage(StageBase, PreferenceSpec):
    type: Literal["online"]
    rounds: int = Field(1, gt=0)
    n_samples: int = Field(4, ge=2)
    prompts_per_round: int | None = Field(None, gt=0)
    generation: GenerationSpec = GenerationSpec()
    judge: JudgeSpec = JudgeSpec()
    pair_selection: Literal["best_worst", "best_random"] = "best_worst"
    reference_mode: Literal["round_start", "fixed"] = "round_start"


class RewardStage(StageBase):
    type: Literal["reward"]
    max_length: int = Field(512, gt=8)
    max_prompt_length: int = Field(256, gt=0)


def _default_eval_data() -> DataSpec:
    return DataSpec(sources=[SourceSpec(path="world:eval", n=200)], shuffle=False)


class EvalStage(Strict):
    type: Literal["eval"]
    name: str | None = None
    data: DataSpec = Field(default_factory=_default_eval_data)
    models: list[str] | None = None   # default: every trained stage of the run
    sft: str | None = None            # reference for win_vs_sft / kl_vs_sft (default: the sft stage)
    judge: JudgeSpec = JudgeSpec(type="gold")
    generation: GenerationSpec = GenerationSpec(temperature=0.7, top_p=0.9, max_new_tokens=256)

    @model_validator(mode="after")
    def _pointwise(self) -> "EvalStage":
        if self.judge.type == "pairwise":
            raise ValueError("judge.type: the eval stage needs a pointwise judge (gold or "
                             "reward_model); pairwise judges cannot give a score")
        return self
    bootstrap: int = Field(1000, ge=0)
    seed: int | None = None


Stage = Annotated[Union[SFTStage, DPOStage, OnlineStage, RewardStage, EvalStage],
                  Field(discriminator="type")]


class WorldSpec(Strict):
    seed: int = 0


class Recipe(Strict):
    name: str | None = None
    seed: int = 0
    model: ModelSpec = ModelSpec()
    world: WorldSpec = WorldSpec()
    stages: list[Stage]
    # experiment trackers (starpo.trackers); left out of dumps when default (stable hashes)
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

    def stage(self, name: str):
        for st in self.stages:
            if st.name == name:
                return st
        raise RecipeError(f"no stage named {name!r}; stages are {[s.name for s in self.stages]}")


# --------------------------------------------------------------------------- loading

def _parse_value(text: str) -> Any:
    """Parse an override value with YAML rules (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``; stages may be named instead of indexed."""
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        path = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            idx = None
            if key.lstrip("-").isdigit():
                idx = int(key)
            else:  # address a stage (or any named list item) by its name or type
                for j, item in enumerate(node):
                    if isinstance(item, dict) and key in (item.get("name"), item.get("type")):
                        idx = j
                        break
            if idx is None or not -len(node) <= idx < len(node):
                raise RecipeError(f"override {dotted}: no list item {key!r} at {path}")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
        else:
            raise RecipeError(f"override {dotted}: {'.'.join(keys[:depth])} is not a mapping")


def _format_validation(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # drop pydantic's discriminator tags ("sft", "dpo", ...) that follow a stage index
        clean = []
        for j, p in enumerate(loc):
            if j > 0 and loc[j - 1].isdigit() and clean and clean[0] == "stages" and \
                    p in ("sft", "dpo", "online", "reward", "eval"):
                continue
            clean.append(p)
        where = ".".join(clean) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = e["msg"]
        lines.append(f"{origin}: {where}: {msg}")
    return "\n".join(lines)


def recipe_from_dict(tree: dict, origin: str = "recipe",
                     overrides: list[str] | None = None) -> Recipe:
    tree = copy.deepcopy(tree)
    for ov in overrides or []:
        if "=" not in ov:
            raise RecipeError(f"override {ov!r} must look like key.path=value")
        key, value = ov.split("=", 1)
        apply_override(tree, key.strip(), _parse_value(value))
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, origin)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with a 'stages' list")
    recipe = recipe_from_dict(tree, origin=str(path), overrides=overrides)
    if recipe.name is None:
        recipe.name = path.stem
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
