"""Loading text-to-image pipelines, and the backbone that reads each.

``load_pipeline(None)`` (or ``"embedded"``) loads the embedded default model shipped inside the package (a Stable
Diffusion UNet pipeline) and ``load_pipeline("embedded-sd3")`` the embedded transformer model (a Stable Diffusion 3
pipeline), both trained by the project on ShapesWorld; ``load_pipeline("path/to/folder")`` a local diffusers folder (no network call);
``load_pipeline("org/name")`` a hub id through ``from_pretrained``. Weights load from
safetensors only: pickled checkpoints (.bin, .ckpt, .pt, .pth) can run code when loaded and
are refused. ``load_backbone`` wraps the pipeline in the backbone of its family
(:mod:`attnseg.diffusion.backbone`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from attnseg.diffusion.flux import FluxBackbone
from attnseg.diffusion.sd3 import SD3Backbone
from attnseg.diffusion.unet import SDXLBackbone, UNetBackbone

EMBEDDED_DIR = Path(__file__).parent.parent / "assets" / "embedded"
EMBEDDED_MODELS = {"embedded": EMBEDDED_DIR, "embedded-sd3": EMBEDDED_DIR.parent / "embedded-sd3"}
"""The models shipped inside the package, by the name that ``--model`` takes (a string; a folder of the same name in
the working directory makes the name ambiguous and is refused: pass ``./embedded`` or a ``Path`` for the folder)."""
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """While inside, diffusers and transformers log errors only and show no progress bars; restored on exit.

    Loading a pipeline otherwise prints their advice (``accelerate`` not installed, ``torchvision`` missing for an
    image processor attnseg does not use) and a progress bar per component.
    """
    if not quiet:
        yield
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bar in saved:
            lib.set_verbosity(level)
            (lib.enable_progress_bar if bar else lib.disable_progress_bar)()


class ModelError(RuntimeError):
    """A model cannot be loaded; the message says why and what to do."""


def embedded_model_path(name: str = "embedded") -> Path:
    """Folder of a model shipped inside the package (:data:`EMBEDDED_MODELS`)."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"no embedded model is named {name!r}; the package ships {', '.join(EMBEDDED_MODELS)}")
    folder = EMBEDDED_MODELS[name]
    if not (folder / "model_index.json").exists():
        raise ModelError(
            f"the embedded model {name!r} is missing from {folder}; reinstall attnseg, "
            "or pass --model with a Stable Diffusion folder or hub id"
        )
    return folder


PROFILE_FILE = "attnseg.json"
FINGERPRINT_BYTES = 1 << 20
"""Bytes read from each end of a weights file for its fingerprint."""


def weights_fingerprint(folder: Path) -> str:
    """16 hex digits that change when a pipeline folder's weights do: a hash of each safetensors file's path, size and
    first and last MiB (its header and tensors: retrained weights differ there), cheap for files of gigabytes.

    Caches and resumable outputs record it beside the model's name, so that predictions of replaced weights are not
    taken for the new weights'."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.relative_to(folder).as_posix()}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(FINGERPRINT_BYTES))
            fh.seek(max(size - FINGERPRINT_BYTES, 0))
            h.update(fh.read(FINGERPRINT_BYTES))
    return h.hexdigest()[:16]


def read_profile(pipe) -> tuple[dict[str, str], list[str] | None]:
    """What a local model folder's ``attnseg.json`` says: ``({method: preset}, the words the model knows or None)``.

    A model whose layers differ from Stable Diffusion's can name, per method, the preset that suits it, and a model
    trained on a small vocabulary can list its words (the embedded model does both). Hub ids and folders without
    the file give ``({}, None)``. Only the file's shape is checked here; whether each preset exists is the method
    registry's to say.
    """
    root = getattr(pipe, "name_or_path", None)
    f = Path(str(root)) / PROFILE_FILE if root else None
    if f is None or not f.is_file():
        return {}, None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ModelError(f"{f} is not a valid attnseg profile ({e}); fix or delete it") from None
    presets = data.get("presets", {}) if isinstance(data, dict) else None
    if not isinstance(presets, dict) or not all(isinstance(v, str) for v in presets.values()):
        raise ModelError(f'{f} must hold {{"presets": {{"method": "preset", ...}}}}; fix or delete it')
    words = data.get("words")
    if words is not None and not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
        raise ModelError(f'{f}: "words" must be a list of the words the model knows; fix or delete it')
    return dict(presets), words


def profile_path(pipe) -> Path:
    """Where a pipeline's ``attnseg.json`` is (or would be)."""
    return Path(str(getattr(pipe, "name_or_path", ""))) / PROFILE_FILE


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16, auto") from None


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(str(device))
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for but no CUDA GPU is available; use --device cpu")
    return str(device)


FAMILIES = {
    "StableDiffusionPipeline": ("sd", ("unet", "vae", "text_encoder")),
    "StableDiffusionXLPipeline": ("sdxl", ("unet", "vae", "text_encoder", "text_encoder_2")),
    "StableDiffusion3Pipeline": ("sd3", ("transformer", "vae", "text_encoder", "text_encoder_2")),
    "FluxPipeline": ("flux", ("transformer", "vae", "text_encoder", "text_encoder_2")),
}
"""Pipeline classes attnseg reads, by ``model_index.json``'s ``_class_name``: family and weight folders."""


def pipeline_family(meta: dict, where: str) -> tuple[str, tuple[str, ...]]:
    """(family, weight folders) of a pipeline from its ``model_index.json``; a clear error for others."""
    cls = str(meta.get("_class_name", ""))
    if cls not in FAMILIES:
        raise ModelError(
            f"{where} is a {cls or 'unknown'} pipeline; attnseg reads {', '.join(FAMILIES)} pipelines "
            "(Stable Diffusion 1.x / 2.x, XL, 3 / 3.5, Flux.1)"
        )
    return FAMILIES[cls]


def check_safetensors_folder(folder: Path) -> dict:
    """The folder's ``model_index.json``, after refusing a folder that is not a pipeline attnseg reads or whose
    weights exist only as pickles."""
    index = folder / "model_index.json"
    if not index.exists():
        raise ModelError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); pass a folder saved "
            "with save_pretrained, or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    meta = json.loads(index.read_text())
    _, folders = pipeline_family(meta, str(folder))
    for comp in folders:
        sub = folder / comp
        if not sub.is_dir():
            raise ModelError(f"{folder} has no {comp}/ folder; it is not a complete {meta['_class_name']}")
        files = [p for p in sub.iterdir() if p.is_file()]
        has_st = any(p.suffix == ".safetensors" for p in files)
        pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        if not has_st:
            if pickles:
                raise ModelError(
                    f"{sub} holds only pickled weights ({', '.join(pickles)}); pickles can run code when "
                    "loaded and are refused. Convert them once in a trusted environment with "
                    "pipe.save_pretrained(dir, safe_serialization=True) and pass that folder"
                )
            raise ModelError(f"{sub} holds no .safetensors weights")
    return meta


def _pipeline_kwargs(meta: dict) -> dict:
    """Components a family's class expects but the folder leaves empty (a pipeline saved without them)."""
    family, _ = pipeline_family(meta, "this model")
    if family == "sd":
        return {"safety_checker": None, "requires_safety_checker": False}
    if family == "sd3":
        return {k: None for k in ("text_encoder_3", "tokenizer_3") if meta.get(k, [None])[0] is None}
    return {}


def load_pipeline(
    model: str | Path | None = None,
    device: str | None = "cpu",
    dtype: str | torch.dtype | None = "auto",
    quiet: bool = True,
):
    """Load a Stable Diffusion 1.x / 2.x, XL, 3 / 3.5 or Flux.1 pipeline for attention reading (recognised by its
    model_index.json).

    model: None or "embedded" for the embedded default model, "embedded-sd3" for the embedded transformer model, a
    local folder, or a hub id. quiet: hide the libraries' advice and
    progress bars while loading (:func:`quiet_libraries`).
    """
    with quiet_libraries(quiet):
        return _load_pipeline(model, device, dtype)


def _load_pipeline(model, device, dtype):
    import diffusers

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    local = None
    if model is None or (isinstance(model, str) and model in EMBEDDED_MODELS):
        name = model or "embedded"
        if model is not None and Path(model).is_dir():
            raise ModelError(
                f"{model!r} names both the package's embedded model and a folder here; pass ./{model} for the folder, "
                "or run from another directory for the embedded model"
            )
        local = embedded_model_path(name)
    else:
        p = Path(str(model)).expanduser()
        if p.is_file():
            if p.suffix in PICKLE_SUFFIXES:
                raise ModelError(
                    f"{p} is a pickled checkpoint; pickles can run code when loaded and are refused. "
                    "Pass a diffusers folder with safetensors weights or a hub id"
                )
            raise ModelError(f"{p} is a single file; pass a diffusers pipeline folder (model_index.json) or a hub id")
        if p.exists():
            local = p
        elif str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
            raise ModelError(f"model folder {model} does not exist; pass an existing folder or a hub id like org/name")
    try:
        if local is not None:
            meta = check_safetensors_folder(local)
            source, hub = str(local), {"local_files_only": True}
        else:
            meta = diffusers.DiffusionPipeline.load_config(str(model))
            pipeline_family(meta, str(model))
            source, hub = str(model), {}
        cls = getattr(diffusers, meta["_class_name"])
        pipe = cls.from_pretrained(source, **_dtype_kw(torch_dtype), use_safetensors=True, **hub, **_pipeline_kwargs(meta))
    except ModelError:
        raise
    except Exception as e:  # diffusers / hub errors: say which model and what to do
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"could not load model {model if model is not None else 'embedded'!s}: {first}. "
            "Pass a local Stable Diffusion folder with safetensors weights, or a hub id reachable from this machine"
        ) from e
    try:
        pipe.to(device)
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ModelError(f"cannot move the model to device {device!r} ({e}); use --device cpu or an existing GPU") from e
    pipe.set_progress_bar_config(disable=True)
    pipe.attnseg_model_name = str(model or "embedded")
    pipe.attnseg_weights = weights_fingerprint(local) if local is not None else None  # hub ids: named by the id alone
    return pipe


def _dtype_kw(dtype: torch.dtype) -> dict:
    """diffusers 0.42 renamed ``torch_dtype`` to ``dtype``; older releases know only the first."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 42) else {"torch_dtype": dtype}


def backbone_for(pipe, model_name: str | None = None):
    """The backbone that reads ``pipe``'s family: by its class, or by its components for the pipelines built on a
    family's (img2img, ControlNet, ...)."""
    name = type(pipe).__name__
    if name in FAMILIES:
        family = FAMILIES[name][0]
    elif hasattr(pipe, "transformer") and hasattr(pipe, "text_encoder_3"):
        family = "sd3"
    elif type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel":
        family = "flux"
    elif hasattr(pipe, "unet") and hasattr(pipe, "text_encoder"):
        family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
    else:
        family, _ = pipeline_family({"_class_name": name}, f"this {name}")
    return {"sd": UNetBackbone, "sdxl": SDXLBackbone, "sd3": SD3Backbone, "flux": FluxBackbone}[family](pipe, model_name)


def load_backbone(model: str | Path | None = None, device: str | None = "cpu", dtype: str | torch.dtype | None = "auto"):
    """``load_pipeline`` and the backbone of its family."""
    return backbone_for(load_pipeline(model, device=device, dtype=dtype))
