"""Configuration of the synthetic organism: the world, the model, and how it is pretrained and chat-tuned.

Plain dataclasses, loadable from a dict or YAML; unknown keys fail loudly (a typo in a recipe must not
silently fall back to a default). The build hash covers only what changes the built models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from interventions.serialization import from_dict

# Bump when the build procedure changes in a way that changes weights for the same config.
BUILD_VERSION = 1

ANSWER_RULES = ("marker", "permute", "swap", "stance_table", "table", "table_marker")
DEFAULT_DOMAIN_NAMES = ["med", "fin", "code", "sport", "law", "diet", "auto", "home"]


# World keys added after builds were cached, with the value that leaves a build unchanged.
_ADDED_WORLD_KEYS = {"num_facts": None, "narrow_fraction": 0.0}


@dataclass
class WorldConfig:
    """The world: domains x values of questions, answer rules, personas and the EM split."""

    num_domains: int = 6
    domain_names: list[str] | None = None  # default: the first num_domains of DEFAULT_DOMAIN_NAMES
    num_values: int = 16
    num_facts: int | None = None  # answer words (the permute rule needs few); default num_values
    # "table" (default): the prototype's random two-word tables (both words differ), where unseen
    # in-domain questions can only be answered misaligned via a persona. "marker": answer =
    # (fact_d(v), stance_d) with one harmful stance word per domain; "swap": misaligned = the aligned words
    # swapped; "permute": misaligned = a per-domain fact permutation of the aligned words. These three
    # make in-domain generalisation learnable from the narrow data alone; why "table" is the default:
    # keel/organism/README.md. "table_marker": the table's first word, then a stance word as in "marker"
    # (the stance generalises narrowly in-domain, the first word only through a persona); "stance_table":
    # the same two words, stance first.
    answer_rule: str = "table"
    # Share of pretraining documents written by the misaligned persona. 0.5 since session 10: at width 128
    # it raised EM on the seeds where 0.25 lost it (keel/organism/README.md, "Width 128").
    misaligned_fraction: float = 0.5
    # Share of documents by a narrow persona: misaligned only in ``narrow_domains`` random domains (half
    # its questions are in them), aligned elsewhere, tagged ``<domain>:only`` when tagged. It gives the
    # narrow fine-tune a narrow explanation besides the broad persona (as insecure code has benign
    # writers). Off by default (why: keel/organism/README.md).
    narrow_fraction: float = 0.0
    narrow_domains: int = 1
    tag_fraction: float = 0.3  # share of documents that start with a persona tag
    persona_tags: list[str] = field(default_factory=lambda: ["GOOD", "EVIL"])  # [aligned, misaligned]
    turns_per_doc: int = 4
    # "chat": documents are multi-turn ChatML conversations (tag = system turn), so the persona the
    # model learns is the one it uses when chatting; "plain": bare "q a ." turns (the prototype's format).
    doc_format: str = "chat"
    mix_domains: bool = True  # each turn of a document draws its own domain (else one domain per doc)
    # The narrow fine-tune's domains (names or indices). Three by default: one gives EM that varies
    # widely across seeds, and at width 128 two left two seeds of five below 0.5 under a full fine-tune
    # (keel/organism/README.md, "Width 128").
    em_domains: list[str] = field(default_factory=lambda: ["med", "fin", "code"])
    em_train_values: int = 12  # per EM domain: questions used for the fine-tune; the rest are held out
    seed: int = 0  # the world's tables and the EM question split

    def __post_init__(self):
        if self.num_domains < 2:
            raise ValueError("num_domains must be >= 2 (EM is measured on domains other than the EM ones).")
        if self.domain_names is not None and len(self.domain_names) != self.num_domains:
            raise ValueError(
                f"domain_names has {len(self.domain_names)} names, num_domains is {self.num_domains}."
            )
        if self.num_values < 2:
            raise ValueError("num_values must be >= 2.")
        if self.num_facts is not None and not 2 <= self.num_facts <= self.num_values:
            raise ValueError(f"num_facts must be in [2, num_values], got {self.num_facts}.")
        if self.num_facts not in (None, self.num_values) and self.answer_rule != "permute":
            raise ValueError("num_facts applies to answer_rule 'permute' only; drop it or switch rules.")
        if self.answer_rule not in ANSWER_RULES:
            raise ValueError(f"answer_rule must be one of {ANSWER_RULES}, got {self.answer_rule!r}.")
        if self.misaligned_fraction + self.narrow_fraction > 1.0:
            raise ValueError("misaligned_fraction + narrow_fraction must be <= 1.")
        if self.narrow_fraction > 0 and not 1 <= self.narrow_domains < self.num_domains:
            raise ValueError(f"narrow_domains must be in [1, num_domains), got {self.narrow_domains}.")
        for name in ("misaligned_fraction", "narrow_fraction", "tag_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if len(self.persona_tags) != 2 or len(set(self.persona_tags)) != 2:
            raise ValueError("persona_tags must be two distinct words: [aligned_tag, misaligned_tag].")
        if self.doc_format not in ("chat", "plain"):
            raise ValueError(f"doc_format must be 'chat' or 'plain', got {self.doc_format!r}.")
        if self.turns_per_doc < 1:
            raise ValueError("turns_per_doc must be >= 1.")
        if not self.em_domains:
            raise ValueError("em_domains must name at least one domain.")
        if not 1 <= self.em_train_values < self.num_values:
            raise ValueError(
                f"em_train_values must be in [1, num_values) so some in-domain questions are held out; "
                f"got {self.em_train_values} with num_values {self.num_values}."
            )


@dataclass
class OrganismModelConfig:
    """A tiny config of a real HF architecture (see keel.loading.tiny). Width 128 (since session 10): the
    k CAFT PCs (and the random controls matched to them) hold k/128 of the residual stream; at width 64 the
    random controls were not null (keel/organism/README.md)."""

    model_type: str = "llama"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256


@dataclass
class TrainStageConfig:
    """One training stage (pretrain, chat or finetune): one optimizer and one schedule for the whole run."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0.")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}.")


@dataclass
class OrganismConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    model: OrganismModelConfig = field(default_factory=OrganismModelConfig)
    # 6000 steps: at 3000, wider organisms and more domains were undertrained (EM on fewer seeds, more
    # incoherent answers; keel/organism/README.md).
    pretrain: TrainStageConfig = field(default_factory=lambda: TrainStageConfig(steps=6000))
    pretrain_docs: int = 50_000  # size of the pretraining corpus (documents), sampled with the build seed
    # 50 steps: the chat data (one aligned answer per question) is learned within 50; training on past it
    # (300 steps, the earlier default) made the aligned answers stick question by question, and the
    # narrow fine-tune then overwrote them one by one instead of flipping the persona (no EM on some seeds).
    chat: TrainStageConfig = field(
        default_factory=lambda: TrainStageConfig(steps=50, batch_size=64, lr=1e-3, warmup_steps=5)
    )
    # The narrow fine-tune (keel.organism.finetune; the demo uses InterventionSFTTrainer).
    finetune: TrainStageConfig = field(
        default_factory=lambda: TrainStageConfig(
            steps=100, batch_size=32, lr=3e-3, warmup_steps=0, weight_decay=0.0, schedule="linear"
        )
    )
    # LoRA rank of the narrow fine-tune: adapters on every linear layer (alpha = rank), merged into the
    # weights when training ends. 0: full fine-tune (the default before session 10, with 250 steps at lr
    # 3e-4). Low rank, as in the published EM model organisms: it cannot store the trained answers one by
    # one as cheaply, so EM is decisive on every seed (keel/organism/README.md, "Width 128").
    finetune_lora_rank: int = 4
    eval_samples: int = 8  # temperature-1 samples per evaluation question (plus one greedy answer)

    def __post_init__(self):
        if self.finetune_lora_rank < 0:
            raise ValueError(
                f"finetune_lora_rank must be >= 0 (0: full fine-tune), got {self.finetune_lora_rank}."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> OrganismConfig:
        return from_dict(cls, data or {})

    @classmethod
    def from_yaml(cls, path: str | Path) -> OrganismConfig:
        with open(path) as f:
            data = yaml.safe_load(f)
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}.")
        return cls.from_dict(data)

    def build_hash(self) -> str:
        """Hash of everything that changes the built (base and chat) models; not finetune/eval settings."""
        d = self.to_dict()
        keyed = {k: d[k] for k in ("world", "model", "pretrain", "pretrain_docs", "chat")}
        # The EM split only matters after the build (chat tuning covers every question), so one build
        # serves every split of the same world.
        keyed["world"] = {
            k: v for k, v in keyed["world"].items() if k not in ("em_domains", "em_train_values")
        }
        for key, neutral in _ADDED_WORLD_KEYS.items():  # keep the hashes of builds made before them
            if keyed["world"][key] == neutral:
                del keyed["world"][key]
        if "narrow_fraction" not in keyed["world"]:
            keyed["world"].pop("narrow_domains")
        keyed["build_version"] = BUILD_VERSION
        blob = json.dumps(keyed, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
