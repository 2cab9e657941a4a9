"""The user's data on disk, read without pickle: an .npz (one array per model input, `labels` optional), an
.npy (the one input of a one-input model; labels from a second .npy) or an image folder (one subfolder per
class, PNG/JPEG files, resized and normalized to float32 NCHW; labels are the sorted subfolder indices)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.specs import TensorSpec
from pocketfleet import PocketfleetError

Split = tuple[dict[str, np.ndarray], "np.ndarray | None"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataFileError(PocketfleetError):
    """A data file or image folder that cannot be read as the model's inputs."""


def read_arrays(file: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz or .npy file (allow_pickle=False: an object array is refused)."""
    if not file.is_file():
        raise DataFileError(f"no such file: {file}")
    try:
        if file.suffix == ".npy":
            return {"": np.load(file, allow_pickle=False)}
        with np.load(file, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # noqa: BLE001 - not a zip, a pickled object array, a truncated member
        raise DataFileError(f"{file} is not a readable {file.suffix or '.npz'} of plain arrays ({exc})") from None


def load_file(file: Path, specs: Sequence[TensorSpec], labels_file: Path | None = None) -> Split:
    """(inputs by name, labels or None) from an .npz or .npy file, cast to the inputs' dtypes."""
    arrays = read_arrays(file)
    if "" in arrays:  # an .npy: the single input
        if len(specs) != 1:
            raise DataFileError(
                f"{file} is one array but the model has {len(specs)} inputs {[s.name for s in specs]}: use an .npz "
                "with one array per input"
            )
        arrays = {specs[0].name: arrays[""]}
    labels = arrays.pop("labels", None)
    if labels_file is not None:
        labels = read_arrays(labels_file).get("", None)
        if labels is None:
            raise DataFileError(f"labels {labels_file} must be an .npy file")
    names = [s.name for s in specs]
    unknown = sorted(set(arrays) - set(names))
    missing = [n for n in names if n not in arrays]
    if missing or unknown:
        raise DataFileError(
            f"{file} has arrays {sorted(arrays)}; the model takes {names}"
            + (f" (missing {missing})" if missing else "") + (f" (unknown {unknown})" if unknown else "")
        )
    out = {}
    for s in specs:
        a = arrays[s.name]
        want = tuple(s.shape[1:])
        if a.ndim != len(s.shape) or any(isinstance(w, int) and w != d for w, d in zip(want, a.shape[1:], strict=True)):
            raise DataFileError(f"{file}: {s.name!r} has shape {list(a.shape)}, the model takes [rows, {', '.join(map(str, want))}]")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DataFileError(f"{file}: {s.name!r} holds NaN or infinite values")
        out[s.name] = np.ascontiguousarray(a.astype(s.dtype, copy=False))
    rows = {len(a) for a in out.values()}
    if len(rows) > 1:
        raise DataFileError(f"{file}: the inputs have different row counts {sorted(rows)}")
    if labels is not None and len(labels) != rows.pop():
        raise DataFileError(f"{file}: {len(labels)} labels for {len(next(iter(out.values())))} rows")
    return out, labels


def load_image_folder(
    folder: Path,
    spec: TensorSpec,
    size: Sequence[int] | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    scale: float = 1.0 / 255.0,
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Images under folder/<class>/ as float32 [rows, C, H, W]: RGB when the input has 3 channels, grayscale
    when 1; resized to `size` ([H, W], default the input's), pixel * scale, then (x - mean) / std per channel.
    Returns (inputs, labels, class names in label order)."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise DataFileError(f"no image folder at {folder}")
    if len(spec.shape) != 4 or not all(isinstance(d, int) for d in spec.shape[1:]):
        raise DataFileError(f"an image folder feeds a [batch, channels, height, width] input; {spec.name!r} is {list(spec.shape)}")
    channels, height, width = (int(d) for d in spec.shape[1:])
    if channels not in (1, 3):
        raise DataFileError(f"an image folder gives 1 (grayscale) or 3 (RGB) channels; {spec.name!r} takes {channels}")
    h, w = (int(size[0]), int(size[1])) if size else (height, width)
    if (h, w) != (height, width):
        raise DataFileError(f"size {[h, w]} does not match {spec.name!r} {list(spec.shape)}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataFileError(f"{folder} has no class subfolders (expected {folder}/<class>/<image>.png)")
    m = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, np.float32).reshape(-1, 1, 1)
    if m.shape[0] not in (1, channels) or s.shape[0] not in (1, channels) or (s == 0).any():
        raise DataFileError(f"mean and std need 1 or {channels} values (std non-zero), got {list(mean)} and {list(std)}")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            try:
                with Image.open(file) as img:
                    img = img.convert("L" if channels == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
                    arr = np.asarray(img, np.float32)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataFileError(f"{file} is not a readable PNG/JPEG image ({exc})") from None
            arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
            images.append((arr * scale - m) / s)
            labels.append(index)
    if not images:
        raise DataFileError(f"{folder}: no .png/.jpg/.jpeg files in the class subfolders {classes}")
    return {spec.name: np.stack(images).astype(np.float32)}, np.asarray(labels, np.int64), classes
