"""params.yaml, loaded once and validated into typed, frozen objects.

Every stage receives only its own section.  Unknown keys and bad values fail
before any work starts, naming the key (pydantic does the naming).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # fields that change how a stage runs but never what it computes
    RUNTIME: ClassVar[frozenset[str]] = frozenset()
    # fields that change only how rows are laid out in files, never a row
    LAYOUT: ClassVar[frozenset[str]] = frozenset({"shard_rows"})

    def digest(self) -> str:
        """A short hash of the values that shape the section's items (recorded
        in their metadata and item keys, so it leaves out RUNTIME and LAYOUT
        fields: changing the shard size recomputes nothing; and `off()`)."""
        exclude = set(self.RUNTIME | self.LAYOUT) | self.off()
        blob = json.dumps(self.model_dump(mode="json", exclude=exclude), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def off(self) -> set[str]:
        """Fields added after items existed, left out of the digest while they
        are off, so those items keep their keys."""
        return set()


TEXTURES = ("gradient", "noise", "stripes", "checker", "dots")


class Split(Section):
    n: int = Field(gt=0)
    seed: int
    min_objects: int = Field(ge=1)
    max_objects: int = Field(ge=1)
    # another world than toyworld's for this split (the ood split): null keeps toyworld's
    shapes: tuple[str, ...] | None = Field(default=None, min_length=1)  # null: toyworld.classes
    textures: tuple[Literal[TEXTURES], ...] | None = Field(default=None, min_length=1)  # null: gradient, noise

    def spec(self) -> dict:
        """What the split's scenes depend on (fields left at null are left out,
        so a split without them keeps the digest and keys it always had)."""
        return self.model_dump(mode="json", exclude_none=True)

    @model_validator(mode="after")
    def _ordered(self) -> "Split":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must be <= max_objects ({self.max_objects})")
        return self


class Toyworld(Section):
    image_size: int = Field(ge=16)
    classes: tuple[str, ...] = Field(min_length=2)
    colors: tuple[str, ...] = Field(min_length=1)
    object_size: tuple[int, int]  # (smallest, largest) px
    train: Split
    test: Split
    ood: Split | None = None  # out-of-distribution evaluation split: shapes, textures, counts train never had
    # unlabeled images of the test split's world (another seed): PNG files, the
    # default `sources.images`, as a user's own folder would be (never evaluated on)
    unlabeled: Split | None = None
    shard_rows: int = Field(default=1024, gt=0)

    @field_validator("object_size")
    @classmethod
    def _sizes(cls, value: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        lo, hi = value
        size = info.data.get("image_size", hi)
        if not 1 <= lo <= hi <= size:
            raise ValueError(f"{list(value)} must be [smallest, largest] with 1 <= smallest <= largest <= "
                             f"image_size ({size})")
        return value

    def split_digest(self, name: str) -> str:
        """What one split's scenes depend on: the world's look and that split
        alone (changing the test split leaves the train split's bytes, and the
        models trained on them, alone)."""
        world = self.model_dump(mode="json", exclude={"train", "test", "ood", "unlabeled"} | set(self.LAYOUT))
        split = getattr(self, name)
        blob = json.dumps({**world, name: split.spec() if split else None}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TrainGenerator(Section):
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    seed: int
    block_out_channels: tuple[int, ...]
    train_timesteps: int = Field(gt=1)
    label_dropout: float = Field(ge=0, lt=1)


class TrainEncoder(Section):
    config: str
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=1)
    lr: float = Field(gt=0)
    seed: int


DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(value: str) -> str:
    """auto (a GPU if there is one), cpu, mps, cuda or cuda:N: a CUDA device
    must exist on this machine (checked when one is asked for, so CPU-only
    params never import torch here)."""
    if not DEVICE.match(value):
        raise ValueError(f"{value!r} is not a device: auto, cpu, mps, cuda or cuda:N")
    if value.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.partition(":")[2] or 0)
        if index >= count:
            raise ValueError(f"{value!r}: this machine has {count or 'no'} CUDA device{'s' if count != 1 else ''}"
                             f"{'' if count else ' (use auto or cpu)'}")
    return value


Device = Annotated[str, AfterValidator(check_device)]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]  # auto: float16 on GPU, float32 on CPU


class Generate(Section):
    model: str = "models/generator"  # a local pipeline directory or a hub id (diffusers)
    classes: tuple[str, ...] = Field(min_length=1)
    prompt_templates: tuple[str, ...] = Field(min_length=1)
    per_prompt: int = Field(gt=0)  # images per (template, class)
    seed: int
    steps: int = Field(gt=0)
    guidance: float = Field(ge=0)
    image_size: int | None = Field(default=None, ge=8)  # None: the model's own size
    batch_size: int = Field(gt=0)
    device: Device = "auto"
    dtype: Dtype = "auto"
    # Token Merging for Stable Diffusion (tomesd): share of the tokens merged in the UNet's
    # full-resolution transformer blocks; 0 = off.  Needs a UNet with transformer blocks
    # (SD 1.x / 2.x layouts): refused for the toy UNet and DiT
    tome_ratio: float = Field(default=0.0, ge=0, lt=1)
    shard_rows: int = Field(default=1024, gt=0)

    def off(self) -> set[str]:
        return set() if self.tome_ratio else {"tome_ratio"}

    @field_validator("prompt_templates")
    @classmethod
    def _template(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [t for t in value if t.count("{}") != 1]
        if bad:
            raise ValueError(f"{bad} must contain '{{}}' once, for the class name")
        return value


class Features(Section):
    RUNTIME = frozenset({"workers"})

    def off(self) -> set[str]:
        return {"tome_r"} if self.merges_nothing else set()

    @property
    def merged_per_block(self) -> int:
        """tome_r's r (of r or [r, inflection])."""
        return self.tome_r if isinstance(self.tome_r, int) else self.tome_r[0]

    @property
    def merges_nothing(self) -> bool:
        """tome_r 0 or [0, inflection]: Token Merging off."""
        return self.merged_per_block == 0

    @model_validator(mode="after")
    def _values(self) -> "Features":
        if isinstance(self.workers, int) and self.workers < 0:
            raise ValueError("workers must be >= 0 or auto")
        if self.merged_per_block < 0:
            raise ValueError(f"tome_r must be >= 0 (tokens merged per block), not {self.merged_per_block}")
        if not isinstance(self.tome_r, int) and not 0 <= self.tome_r[1] <= 1:
            raise ValueError(f"tome_r: the inflection must be in [0, 1], not {self.tome_r[1]}")
        return self

    encoder: str = "models/encoder"  # open_clip (dir, ARCH:TAG, random:ARCH:SEED) or timm:NAME / timm:local-dir:PATH
    batch_size: int = Field(gt=0)
    patches: bool
    # encoder (= encoder:keys), encoder:tokens, or unet:MODULE:TIMESTEP[:SEED]
    patch_backbone: str = "encoder"
    # Token Merging: patch tokens merged in each ViT block (ToMe's r), or [r, inflection]
    # (a ramp from r(1-inflection) to r(1+inflection)); 0 = off
    tome_r: int | tuple[int, float] = 0
    # threads decoding and preprocessing ahead of the model; auto: 2 when it runs
    # on a GPU, 0 (inline) on CPU, where the model already keeps every core busy
    workers: int | Literal["auto"] = "auto"
    device: Device = "auto"
    dtype: Dtype = "auto"  # autocast dtype on GPU; CPU always runs float32
    shard_rows: int = Field(default=1024, gt=0)


class Discover(Section):
    def method_for(self, source: str) -> str:
        """The cut for images of `source` (generated or imported)."""
        return (self.imported_method or self.method) if source == "imported" else self.method

    # which images are discovered in picks items, never changes one: not part of item keys;
    # imported_method is in the keys of imported items only
    LAYOUT = frozenset({"shard_rows", "sources", "imported_method"})

    def off(self) -> set[str]:
        return {name for name, off in (("on_merged", False), ("solver", "scipy")) if getattr(self, name) == off}

    classes: tuple[str, ...] = Field(min_length=2)
    prompt_template: str
    sources: tuple[Source, ...] = Field(default=("generated", "imported"), min_length=1)  # images to discover in
    method: Literal["tokencut", "maskcut"] = "tokencut"
    imported_method: Literal["tokencut", "maskcut"] | None = None  # imported images' cut; null: `method`
    tau: float
    eps: float = Field(gt=0, lt=1)  # the weight of a dissimilar pair: below a similar pair's 1
    max_objects: int = Field(default=3, ge=1)
    min_area: float = Field(default=0.01, ge=0, lt=1)
    # cut the merged graph: patches with identical features (features.tome_r's merged
    # tokens, mapped back to the grid) are one node weighing as many (the same cut, fewer nodes)
    on_merged: bool = False
    # scipy: each image's graph solved alone (ARPACK / dense eigh); torch: the images of a batch
    # solved together (batched Lanczos / dense eigh, on features.device: the GPU when there is one)
    solver: Literal["scipy", "torch"] = "scipy"
    shard_rows: int = Field(default=4096, gt=0)

    @field_validator("tau")
    @classmethod
    def _tau(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"{value} must be in [0, 1): a threshold on the cosine similarity of two patches (an "
                             "edge above it); below 0 nearly every pair is an edge (a complete graph: cuts slow by "
                             "orders of magnitude, no object found), at 1 none is (TokenCut uses 0.2 on ViT keys)")
        return value


class TrainDetector(Section):
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    seed: int
    min_size: int = Field(ge=16)
    drop_loss_iou: float | None = Field(default=0.01, ge=0, lt=1)
    class_aware: bool = False
    copy_paste: float = Field(default=0.0, ge=0, le=1)  # per image and step: paste one discovered object
    masks: bool = False  # Mask R-CNN: also learn the discovered masks (evaluate adds mask AP)
    self_train_scores: tuple[Annotated[float, Field(ge=0, le=1)], ...] = ()
    self_train_steps: int = Field(default=100, gt=0)
    # each source's share of a batch (among those with discovered objects); 0 leaves it out
    mix: dict[Source, Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: {"generated": 1.0, "imported": 1.0})
    scale_jitter: tuple[float, float] | None = None  # e.g. [0.75, 1.25]: each batch at a random scale of min_size
    drop_spanning: bool = False  # a pseudo-box as wide or as tall as its image is background, not an object


class Sources(Section):
    """Images of your own (stage import): folders (searched recursively), globs,
    or COCO JSON files (their `images` list, file names relative to the JSON's
    folder); paths relative to the project root."""

    images: tuple[str, ...] = ()
    max_size: int = Field(default=512, ge=16)  # px, the longest side: bigger images are resized (recorded)
    shard_rows: int = Field(default=1024, gt=0)

    @field_validator("images")
    @classmethod
    def _entries(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, entry in enumerate(value):
            if not str(entry).strip():
                raise ValueError(f"entry {i} is empty")
        return value


Source = Literal["generated", "imported"]


class Curate(Section):
    """Stage curate: which generated images discover and train_detector use."""

    enabled: bool = False  # off: every image is kept (the stage records them all)
    dedup_eps: float = Field(default=0.05, gt=0, lt=1)  # duplicates: cosine > 1 - dedup_eps within a cluster
    clusters: tuple[Annotated[int, Field(ge=1)], ...] = Field(default=(24, 6), min_length=1)  # k per level
    per_cluster: int | None = Field(default=None, ge=1)  # at most this many per first-level cluster
    target: int | None = Field(default=None, ge=1)  # images kept in all, balanced over the cluster tree
    seed: int = 0


class Concepts(Section):
    """Stage concepts: units of the generator and the encoders that fire together (Rosetta Neurons)."""

    # which images and how they are chunked, how pairs are picked and scored: never a chunk's moments
    LAYOUT = frozenset({"shard_rows", "sources", "images", "chunk", "top_k", "min_corr", "clusters", "top_q",
                        "object_iou", "plot_concepts", "sample_images"})

    sources: tuple[Literal["generated", "imported"], ...] = Field(default=("generated", "imported"), min_length=1)
    images: int | None = Field(default=None, ge=2)  # at most this many, in table order (null: all)
    models: tuple[str, ...] = ()  # more encoders (a zoo): a Rosetta unit has a best buddy in each
    generator_layers: tuple[str, ...] = ()  # UNet modules (empty: every resnet of the down, mid and up blocks)
    encoder_layers: tuple[int, ...] = ()  # blocks whose MLP activation is kept (empty: every block)
    timestep: int = Field(default=10, ge=0)  # the UNet sees the image noised to this step (DDAE: small is best)
    noise_seed: int = 0
    grid: int = Field(default=8, ge=1)  # every map resized to grid x grid (the toy encoder's patch grid)
    top_k: int = Field(default=5, ge=1)  # a's best match b is a buddy when a is in b's top_k (1: strictly mutual)
    min_corr: float = Field(default=0.3, ge=-1, le=1)  # weaker pairs are not buddies
    clusters: int = Field(default=8, ge=1)  # concepts: k-means clusters of the trained pairs' mean maps
    top_q: float = Field(default=0.2, gt=0, le=1)  # a pair's mask on a scene: its top share of pixels
    object_iou: float = Field(default=0.5, gt=0, le=1)  # an object concept: mean mask IoU at least this
    random_seed: int = 0  # the random-weight twins of both models
    chunk: int = Field(default=100, ge=1)  # images per chunk of moments (the unit of reuse)
    batch_size: int = Field(default=32, gt=0)  # images per forward pass (float sums depend on it: in the keys)
    device: Device = "auto"
    plot_concepts: int = Field(default=6, ge=0)  # concepts drawn in plots/concepts.png
    plot_images: int = Field(default=3, ge=1)  # generated images per concept in the picture
    sample_images: int = Field(default=64, ge=1)  # generated images the concepts are clustered on (first: drawn)
    shard_rows: int = Field(default=4, gt=0)  # chunks per shard (a chunk's row is ~20 MB with the toy models)

    def moments_digest(self) -> str:
        return self.digest()


class Evaluate(Section):
    iou: float = Field(gt=0, le=1)
    random_seed: int
    score_thresh: float = Field(ge=0, le=1)
    grid_images: int = Field(ge=0)
    # distribution metrics of the generated images (FD, KID, precision/recall, density/coverage) against
    # `reference` (toyworld: the train split; imported: sources.images), both at N = quality_n
    reference: Literal["toyworld", "imported"] = "toyworld"
    quality_n: int = Field(default=250, ge=0)  # 0: no distribution metrics
    quality_k: int = Field(default=5, ge=1)  # neighbours of the k-NN manifolds (prdc's k)
    quality_bootstrap: int = Field(default=50, ge=0)  # resamples for the 95% intervals


class Alerts(Section):
    webhook: str | None = None  # a failed pipeline run POSTs its stage and cause here as JSON
    # a run whose metric fell by more than this from the last run with its params digest POSTs too:
    # one number for every metric followed (mirage/run/trends.py), or {metric: drop}
    max_drop: Annotated[float, Field(ge=0)] | dict[str, Annotated[float, Field(ge=0)]] | None = None

    @field_validator("webhook")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v


class Errors(Section):
    """How many bad items (undecodable images, non-finite features, images
    where discovery finds no object) a stage tolerates: they are listed in the
    table's errors.parquet and retried by the next run; past this share of the
    stage's items the stage fails."""

    max_fraction: float = Field(default=0.05, ge=0, le=1)


class Runner(Section):
    """Where item batches and stages run: never what they compute (outputs are
    byte-identical on every runner), so no stage depends on it."""

    kind: Literal["local", "dask"] = "local"
    address: str | None = None  # an existing Dask scheduler (tcp://host:8786); None: start a cluster
    n_workers: int = Field(default=2, ge=1)  # LocalCluster's workers (processes)
    threads_per_worker: int = Field(default=1, ge=1)
    cluster_class: str | None = None  # instead of LocalCluster: dask_cuda.LocalCUDACluster, dask_jobqueue.SLURMCluster
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict)  # that class's arguments
    adapt: dict[str, int] | None = None  # adaptive scaling, e.g. {minimum: 1, maximum: 8}
    batches_per_task: int | Literal["auto"] = "auto"  # Dask: batches one Prefect task computes (auto: <= 8)
    parallel_stages: int = Field(default=2, ge=1)  # stale stages with their upstream done that run at once
    checkpoint_every: int = Field(default=50, ge=0)  # training steps between checkpoints (0: none)
    retries: int = Field(default=2, ge=0)  # a failed batch is computed again this many times
    retry_delay: float = Field(default=1.0, ge=0)  # seconds before the first retry, doubled for each next one

    @field_validator("batches_per_task")
    @classmethod
    def _per_task(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or auto")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and "://" not in v:
            raise ValueError(f"must be a Dask scheduler address like tcp://host:8786, got {v!r}")
        return v

    @field_validator("cluster_class")
    @classmethod
    def _cluster_class(cls, v: str | None) -> str | None:
        import importlib.util

        if v is None:
            return v
        module, _, name = v.rpartition(".")
        if not module or not name:
            raise ValueError(f"must be a dotted class path like dask_cuda.LocalCUDACluster, got {v!r}")
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ValueError(f"{v!r}: module {module!r} is not installed (pip install {module.split('.')[0].replace('_', '-')})")
        return v

    @model_validator(mode="after")
    def _one_cluster(self) -> "Runner":
        if self.address and (self.cluster_class or self.cluster_kwargs or self.adapt):
            raise ValueError("address attaches to a running cluster: leave cluster_class, cluster_kwargs and adapt unset")
        return self


class Params(Section):
    # who hears of failures, where batches run and how many bad items fail a stage are not the experiment
    RUNTIME = frozenset({"alerts", "runner", "errors"})

    toyworld: Toyworld
    sources: Sources = Sources()
    train_generator: TrainGenerator
    train_encoder: TrainEncoder
    generate: Generate
    features: Features
    discover: Discover
    train_detector: TrainDetector
    curate: Curate = Curate()
    concepts: Concepts = Concepts()
    evaluate: Evaluate
    alerts: Alerts = Alerts()
    runner: Runner = Runner()
    errors: Errors = Errors()


class ParamsError(ValueError):
    """A bad params.yaml, with the offending keys named."""


def set_key(tree: dict[str, Any], dotted: str, value: Any, in_place_anchors: bool = False) -> None:
    """Apply one `-S section.key=value` override; the key must already exist.
    With `in_place_anchors`, a list that is a YAML anchor (`&classes`) is
    changed in place, so its aliases (`*classes`) follow it, as YAML means."""
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise ParamsError(f"unknown parameter {'.'.join(parents[: i + 1])!r}{did_you_mean(part, node, parents[:i])}")
        node = node[part]
    if leaf not in node:
        raise ParamsError(f"unknown parameter {dotted!r}{did_you_mean(leaf, node, parents)}")
    old = node[leaf]
    anchor = getattr(getattr(old, "anchor", None), "value", None)
    if in_place_anchors and anchor and isinstance(value, list) and _first_path(tree, old) == dotted:
        old[:] = value  # the anchor itself: its aliases follow
    else:
        node[leaf] = value  # a plain value, or an alias site: only this key changes


def did_you_mean(name: str, known, parents: list[str] | tuple = ()) -> str:
    """`: did you mean 'section.key'?` for the closest known key, or ''."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f": did you mean {'.'.join([*map(str, parents), close[0]])!r}?" if close else ""


def _fields_at(loc: tuple) -> list[str]:
    """The field names of the section at `loc` (a pydantic error location)."""
    model: Any = Params
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _first_path(tree: dict[str, Any], target: Any, prefix: str = "") -> str | None:
    """The dotted key where `target` first occurs in document order (where a
    YAML anchor is written; later occurrences are its aliases)."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if value is target:
            return path
        if isinstance(value, dict):
            found = _first_path(value, target, path + ".")
            if found:
                return found
    return None


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; raise ParamsError naming every bad key."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found (run from the project root or pass --params)")
    tree = yaml.safe_load(path.read_text()) or {}
    for key, value in (overrides or {}).items():
        set_key(tree, key, value)
    return validate(tree, path)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value parsed as YAML (so 3, 0.5, true, [a, b] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ParamsError(f"override {text!r} must look like section.key=value")
    return key.strip(), yaml.safe_load(raw)


def write_overrides(path: str | Path, overrides: dict[str, Any]) -> None:
    """Write overrides into params.yaml in place (what `dvc exp run -S` does)."""
    from ruamel.yaml import YAML  # round-trips comments and anchors (DVC depends on it)

    path = Path(path)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 1 << 16  # never fold a line: every line an override does not touch stays as it was
    rt.Representer = _null_representer()
    tree = rt.load(path.read_text())
    for key, value in overrides.items():
        set_key(tree, key, _flow_style(value), in_place_anchors=True)
    validate(yaml.safe_load(_dump(rt, tree)), path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_dump(rt, tree))
    tmp.replace(path)


def _null_representer():
    from ruamel.yaml.representer import RoundTripRepresenter

    class NullRepresenter(RoundTripRepresenter):
        """Writes None as `null` (ruamel's round-trip default is an empty
        value).  A subclass: DVC writes dvc.lock with ruamel in this process,
        and its representer must stay as it is."""

    NullRepresenter.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return NullRepresenter


def _flow_style(value: Any) -> Any:
    """Lists and mappings written inline, `[a, b]` and `{a: 1}`, as params.yaml
    writes them: the key's one line changes, no line is added."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, dict):
        inline = CommentedMap((k, _flow_style(v)) for k, v in value.items())
    elif isinstance(value, list):
        inline = CommentedSeq(_flow_style(v) for v in value)
    else:
        return value
    inline.fa.set_flow_style()
    return inline


def _dump(rt, tree) -> str:
    import io

    buf = io.StringIO()
    rt.dump(tree, buf)
    return buf.getvalue()


def validate(tree: dict[str, Any], path: Path) -> Params:
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = e["loc"]
            hint = did_you_mean(loc[-1], _fields_at(loc[:-1]), loc[:-1]) if e["type"] == "extra_forbidden" else ""
            shown = e["type"] not in ("extra_forbidden", "missing") and not isinstance(e["input"], dict)
            value = f" (got {repr(e['input'])[:80]})" if shown else ""
            lines.append(f"  {'.'.join(str(p) for p in loc)}: {e['msg']}{value}{hint}")
        raise ParamsError(f"invalid {path}:\n" + "\n".join(lines)) from None
