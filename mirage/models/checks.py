"""Configured models checked before any work starts.

`params.py` checks values; this checks that the models they name can be
loaded: a local path exists and holds a model, an architecture is known, a DiT
knows the classes asked of it, a patch backbone names a real module.  Each
failure names the parameter (ParamsError: `mirage` exits 2, params.yaml as it was).
Hub models that are not downloaded yet cannot be checked offline; their
loaders name the parameter when they fail.
"""
from __future__ import annotations

import json
from pathlib import Path

from mirage.data.params import Params, ParamsError


def _looks_local(value: str, root: Path) -> bool:
    """A value meant as a local path: it exists, is absolute or relative
    (./, ../, ~), or its first component is a folder of the project (models/x)."""
    first = value.split("/", 1)[0]
    return (root / value).exists() or value.startswith(("/", ".", "~")) or ("/" in value and (root / first).is_dir())


def check_generator(params: Params, root: Path) -> None:
    cfg = params.generate
    if not _looks_local(cfg.model, root):
        return  # a hub id: checked by the loader
    path = root / cfg.model
    index = path / "model_index.json"
    if not index.is_file():
        raise ParamsError(f"generate.model: {cfg.model!r} is not a diffusers pipeline directory "
                          f"({'no model_index.json in it' if path.is_dir() else 'no such directory'})")
    meta = json.loads(index.read_text())
    if cfg.tome_ratio and meta.get("_class_name") in ("ToyPipeline", "DiTPipeline"):
        raise ParamsError(f"generate.tome_ratio: {cfg.tome_ratio}, but {cfg.model} is a {meta['_class_name']} "
                          "(Token Merging needs a UNet with transformer blocks, SD 1.x/2.x): set it to 0")
    if meta.get("_class_name") == "DiTPipeline" and meta.get("id2label"):
        known = {n.strip() for names in meta["id2label"].values() for n in names.split(",")}
        unknown = [c for c in cfg.classes if c not in known and not c.isdigit()]
        if unknown:
            raise ParamsError(f"generate.classes: {unknown} are not classes of {cfg.model} (e.g. {sorted(known)[:5]})")


def check_encoder(params: Params, root: Path, key: str = "features.encoder") -> None:
    value = params.features.encoder
    rest = value.removeprefix("timm:")
    timm = value.startswith("timm:")
    if rest.startswith("random:"):
        from mirage.models.encoders import random_spec

        try:
            rest = random_spec(rest)[0]
        except ValueError:
            raise ParamsError(f"{key}: {value!r}: expected {'timm:' if timm else ''}random:ARCH:SEED") from None
    if rest.startswith("local-dir:") or (not timm and _looks_local(rest, root)):
        path = root / rest.removeprefix("local-dir:")
        if not path.is_dir():
            raise ParamsError(f"{key}: {value!r}: no such directory")
        if not ((path / "open_clip_config.json").is_file() or (path / "config.json").is_file()):
            raise ParamsError(f"{key}: {path} holds neither open_clip_config.json (open_clip) nor config.json (timm)")
        return
    if timm:
        import timm as timm_lib

        if not timm_lib.is_model(rest.split(".")[0]):
            raise ParamsError(f"{key}: {value!r}: unknown timm model {rest.split('.')[0]!r}")
        return
    import open_clip

    arch, _, tag = rest.partition(":")
    if arch not in open_clip.list_models():
        raise ParamsError(f"{key}: {value!r}: unknown open_clip architecture {arch!r} "
                          "(a saved directory, ARCH:TAG, random:ARCH:SEED or timm:NAME)")
    if tag and not Path(tag).exists() and tag not in open_clip.list_pretrained_tags_by_model(arch):
        raise ParamsError(f"{key}: {value!r}: {arch} has no pretrained tag {tag!r} "
                          f"(known: {open_clip.list_pretrained_tags_by_model(arch)})")


def check_patch_backbone(params: Params, root: Path) -> None:
    from mirage.models.patch_backbones import parse_patch_backbone

    try:
        kind, module, *_ = parse_patch_backbone(params.features.patch_backbone)
    except ValueError as err:
        raise ParamsError(str(err)) from None
    if kind != "unet" or not params.features.patches:
        return
    path = root / params.generate.model
    index = path / "model_index.json"
    if not index.is_file() or json.loads(index.read_text()).get("_class_name") != "ToyPipeline":
        raise ParamsError(f"features.patch_backbone: {params.features.patch_backbone!r} needs the toy pipeline's "
                          f"UNet, but generate.model is {params.generate.model!r} (use encoder:keys)")
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config(UNet2DModel.load_config(path / "unet"))
    try:
        unet.get_submodule(module)
    except AttributeError:
        raise ParamsError(f"features.patch_backbone: the UNet of {params.generate.model} has no module {module!r}") from None


def check_concepts(params: Params, root: Path) -> None:
    """Stage concepts' layers exist in the generator's UNet (a local pipeline: a hub
    model's is checked by the stage) and its zoo's encoders are loadable."""
    cfg = params.concepts
    for i, model in enumerate(cfg.models):
        check_encoder(params.model_copy(update={"features": params.features.model_copy(update={"encoder": model})}),
                      root, f"concepts.models[{i}]")
    path = root / params.generate.model
    if not cfg.generator_layers or not (path / "unet" / "config.json").is_file():
        return
    config = json.loads((path / "unet" / "config.json").read_text())
    import diffusers

    unet = getattr(diffusers, config["_class_name"]).from_config(config)
    missing = [n for n in cfg.generator_layers if not _has_module(unet, n)]
    if missing:
        raise ParamsError(f"concepts.generator_layers: the UNet of {params.generate.model} has no module {missing} "
                          f"(e.g. {[n for n, _ in unet.named_modules() if n.endswith('resnets.0')][:4]})")


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def check_models(params: Params, root: str | Path = ".") -> None:
    """Every configured model loadable, or ParamsError naming the key."""
    root = Path(root)
    check_generator(params, root)
    check_encoder(params, root)
    check_patch_backbone(params, root)
    check_concepts(params, root)
