"""Images for SwAV: multi-crop augmentation (torchvision.transforms.v2) and the datasets it reads.

Sources (the `data:` section):
  data.kind=generated, data.name=shapes   procedurally drawn shapes, 10 classes, white on black, random
                                          position, size, rotation, stroke and noise (labels are held out: used
                                          only by the kNN / linear-probe evaluation). No download.
                                          shapes_gray: random grey levels; shapes_colour: random colours (a
                                          colour shortcut that only strong colour augmentation removes).
  data.kind=generated, data.name=digits   scikit-learn's 8x8 digits, upscaled (ships with scikit-learn).
  data.kind=generated, data.name=synthetic   random uint8 crops of the configured sizes, no augmentation:
                                          a throughput probe of the model step only (bench/swav_small.py --gpu).
  data.kind=imagefolder, data.path=ROOT   torchvision ImageFolder: ROOT/<train_split>/<class>/*.jpg and
                                          ROOT/<eval_split>/<class>/*.jpg.
  data.kind=hf, data.hf_name=... or data.path=<save_to_disk folder>   a Hugging Face `datasets` image set;
                                          recipe.image_field holds the image, data.label_field the label.

Crops and images stay uint8 [3, s, s] up to the model, which converts and normalises them on the device
(4x less host memory traffic and host->device copy than float crops).
A training item is (list of crops, label); an evaluation item is (image, label). `collate` batches either
into {"crops": [tensor per crop, B x 3 x s x s], "label"} or {"image", "label"}.

All randomness goes through torch's RNG (never numpy's global one). A training item's crops are a pure function
of (seed, optimizer step, image index) (`TransformedImages` with a seed): not of which DataLoader worker makes
them or what that worker drew before, so that a resumed run, whose workers start afresh at its checkpoint's step,
draws the crops the uninterrupted run drew (a worker's own RNG, seeded when the loader's iterator is created, did
not). Subsets (data.max_*_samples, the probe set) are seeded random draws (`subset`), not the first images: an
image folder lists its images class by class.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2

log = logging.getLogger("runx.swav")

# data.name -> palette of the generated shapes
SHAPE_PALETTES = {"shapes": "mono", "shapes_gray": "gray", "shapes_colour": "colour"}
SHAPE_CLASSES = ("disk", "ring", "square", "square_outline", "triangle", "triangle_outline", "cross",
                 "star", "crescent", "half_disk")


# ---------------------------------------------------------------------------------------------------------
# multi-crop (SwAV sec. 3.2, `multicropdataset.py`): per crop group a RandomResizedCrop at its own size and
# scale range, then flip, colour jitter, grayscale, Gaussian blur, normalisation, each crop independently.
# ---------------------------------------------------------------------------------------------------------
def _blur_kernel(size: int) -> int:
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def crop_pipeline(rc, size: int, min_scale: float, max_scale: float) -> v2.Compose:
    bri, con, sat, hue = (float(v) for v in rc.color_jitter)
    steps = [v2.ToImage(),
             v2.RandomResizedCrop(size, scale=(min_scale, max_scale), antialias=True)]
    if rc.flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(rc.flip_prob))
    if rc.color_jitter_prob > 0 and max(bri, con, sat, hue) > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(bri, con, sat, hue)], p=rc.color_jitter_prob))
    if rc.grayscale_prob > 0:
        steps.append(v2.RandomGrayscale(rc.grayscale_prob))
    if rc.blur_prob > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=tuple(rc.blur_sigma))],
                                    p=rc.blur_prob))
    steps.append(v2.ToPureTensor())   # uint8; the model normalises on the device (SwAVNet._input)
    return v2.Compose(steps)


class MultiCrop:
    """image -> [crop_0, ..., crop_{n-1}]: nmb_crops[i] crops of size_crops[i], large crops first."""

    def __init__(self, rc):
        self.pipelines = []
        for n, size, lo, hi in zip(rc.nmb_crops, rc.size_crops, rc.min_scale_crops, rc.max_scale_crops):
            self.pipelines += [crop_pipeline(rc, int(size), float(lo), float(hi))] * int(n)

    def __call__(self, image) -> list[torch.Tensor]:
        return [p(image) for p in self.pipelines]


def eval_pipeline(rc, size: int, resize: bool) -> v2.Compose:
    """Frozen-feature evaluation: Resize(size * 256/224) + CenterCrop(size) for real photos; generated
    images are already `size` pixels and only get normalised."""
    steps = [v2.ToImage()]
    if resize:
        steps += [v2.Resize(int(round(size * 256 / 224)), antialias=True), v2.CenterCrop(size)]
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


def collate(examples: list):
    crops_or_image, labels = zip(*examples)
    label = torch.as_tensor(labels, dtype=torch.long)
    if isinstance(crops_or_image[0], (list, tuple)):
        n = len(crops_or_image[0])
        return {"crops": [torch.stack([ex[i] for ex in crops_or_image]) for i in range(n)], "label": label}
    return {"image": default_collate(list(crops_or_image)), "label": label}


# ---------------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------------
class TransformedImages(Dataset):
    """(transform(image_i), label_i) over images held by a `source` with __len__ and get(i) -> (img, label).

    With `seed` (the training set), a DataLoader's batch of image indices (`__getitems__`) is transformed with
    torch's RNG seeded from (seed, optimizer step, image index), the step counted from `begin(step)` over the
    micro-batches this rank's loader fetches (`micro_per_step` per optimizer step; a worker of W fetches every
    W-th, in turn: DataLoader hands the batches out round-robin). The same image at the same step gets the same
    crops whichever worker, or how many processes, make them; a resumed run gets the crops of the uninterrupted
    one. One pass per `begin`: the trainer makes one training iterator per run. A single item (`ds[i]`) draws
    from torch's global RNG, as without a seed."""

    def __init__(self, source, transform, indices=None, seed: int | None = None, micro_per_step: int = 1):
        self.source, self.transform = source, transform
        self.indices = list(range(len(source))) if indices is None else list(indices)
        self.seed, self.micro_per_step = seed, max(1, int(micro_per_step))
        self.begin(0)

    def begin(self, step: int) -> None:
        """The next loader over this dataset starts at optimizer step `step` (a resumed run: its checkpoint's)."""
        self._first_micro, self._fetched = int(step) * self.micro_per_step, 0

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, label = self.source.get(self.indices[i])
        return self.transform(img), label

    def sample(self, i, step: int):
        """Item i as the training loader makes it at optimizer step `step`: a pure function of (seed, step, image)."""
        state = torch.get_rng_state()
        try:   # (the CPU generator the transforms draw from; torch.manual_seed would reseed the GPUs' too)
            torch.default_generator.manual_seed(augmentation_seed(self.seed, step, self.indices[i]))
            return self[i]
        finally:   # (the main process's RNG is the trainer's, checkpointed and restored on resume)
            torch.set_rng_state(state)

    def __getitems__(self, indices):
        """A whole batch (DataLoader's batched fetch) on one intra-op thread: per-image ops on small tensors
        are many times slower with a thread pool (hue jitter on 3x32x32: 47 ms with 2 threads, 0.9 ms with 1)."""
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self.seed is None:
                return [self[i] for i in indices]
            info = torch.utils.data.get_worker_info()
            worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
            step = (self._first_micro + self._fetched * workers + worker) // self.micro_per_step
            self._fetched += 1
            return [self.sample(i, step) for i in indices]
        finally:
            torch.set_num_threads(n)


def seed_of(*parts) -> int:
    """A 64-bit seed for torch's RNG that is a hash of `parts` (ints and strings): nearby parts (step 7, step 8)
    give unrelated random streams."""
    import hashlib
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def augmentation_seed(seed: int, step: int, index: int) -> int:
    """The seed of the augmentation of image `index` at optimizer step `step` of a run seeded `seed`."""
    return seed_of("swav-crops", int(seed), int(step), int(index))


class TensorImages:
    """uint8 images [N, 3, H, W] in memory, with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def get(self, i):
        return self.images[i], int(self.labels[i])


def _draw_shape(cls: int, rng: np.random.Generator, size: int, palette: str = "mono") -> np.ndarray:
    """One RGB uint8 image [size, size, 3] of shape class `cls`, drawn at 4x and box-downsampled.
    palette: colour (random foreground and background colours), gray (random grey levels), mono (white on black)."""
    from PIL import Image, ImageDraw
    s = 4 * size
    if palette == "mono":
        bg, fg = np.zeros(3, int), np.full(3, 255)
    elif palette == "gray":
        bg = np.full(3, rng.integers(0, 256))
        fg = np.full(3, rng.integers(0, 256))
        while abs(int(fg[0]) - int(bg[0])) < 80:
            fg = np.full(3, rng.integers(0, 256))
    else:
        bg = rng.integers(0, 256, 3)
        fg = rng.integers(0, 256, 3)
        while np.abs(fg.astype(int) - bg.astype(int)).sum() < 200:   # keep the shape visible
            fg = rng.integers(0, 256, 3)
    img = Image.new("RGB", (s, s), tuple(int(c) for c in bg))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.36) * s
    cx, cy = rng.uniform(r, s - r, 2)
    rot = rng.uniform(0, 2 * math.pi)
    width = max(2, int(rng.uniform(0.06, 0.14) * s))
    col = tuple(int(c) for c in fg)

    def poly(n, radius, phase=0.0):
        return [(cx + radius * math.cos(rot + phase + 2 * math.pi * k / n),
                 cy + radius * math.sin(rot + phase + 2 * math.pi * k / n)) for k in range(n)]

    name = SHAPE_CLASSES[cls]
    box = [cx - r, cy - r, cx + r, cy + r]
    if name == "disk":
        d.ellipse(box, fill=col)
    elif name == "ring":
        d.ellipse(box, outline=col, width=width)
    elif name == "square":
        d.polygon(poly(4, r), fill=col)
    elif name == "square_outline":
        d.polygon(poly(4, r), outline=col, width=width)
    elif name == "triangle":
        d.polygon(poly(3, r), fill=col)
    elif name == "triangle_outline":
        d.polygon(poly(3, r), outline=col, width=width)
    elif name == "cross":
        for k in range(2):
            a = rot + k * math.pi / 2
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=col, width=int(width * 1.5))
    elif name == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = rot + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=col)
    elif name == "crescent":
        d.ellipse(box, fill=col)
        ox, oy = 0.45 * r * math.cos(rot), 0.45 * r * math.sin(rot)
        d.ellipse([cx - 0.85 * r + ox, cy - 0.85 * r + oy, cx + 0.85 * r + ox, cy + 0.85 * r + oy],
                  fill=tuple(int(c) for c in bg))
    elif name == "half_disk":
        deg = math.degrees(rot)
        d.pieslice(box, deg, deg + 180, fill=col)
    img = img.resize((size, size), Image.BOX)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(2, 12), arr.shape)           # sensor noise
    return np.clip(arr, 0, 255).astype(np.uint8)


def generate_shapes(n: int, size: int, seed: int, palette: str = "mono") -> TensorImages:
    """n images, classes balanced (i % 10), deterministic in (n, size, seed, palette)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPE_CLASSES)
    rng.shuffle(labels)
    imgs = np.stack([_draw_shape(int(c), rng, size, palette) for c in labels])
    return TensorImages(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))


def load_digits_images(size: int) -> TensorImages:
    """scikit-learn's 1797 8x8 digits (16 grey levels), bilinearly upscaled to size x size, 3 channels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]                # N,1,8,8 in [0,1]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return TensorImages(x, torch.from_numpy(d.target.astype(np.int64)))


class FolderImages:
    """torchvision ImageFolder, images as RGB PIL. `classes`: the training split's class list, so that an eval
    split with fewer classes (or in another order on disk) keeps the training split's label numbers."""

    def __init__(self, root: str, classes: list[str] | None = None):
        from torchvision.datasets import ImageFolder
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.path: image folder {root!r} does not exist (expected "
                                    f"<data.path>/<split>/<class>/<image>)")

        class _Folder(ImageFolder):
            def find_classes(self, directory):
                found, _ = super().find_classes(directory)
                if classes is None:
                    return found, {c: i for i, c in enumerate(found)}
                extra = sorted(set(found) - set(classes))
                if extra:
                    from runx.trainers.recipe import RecipeConfigError
                    raise RecipeConfigError(f"data.eval_split: {directory} has classes the training split lacks: "
                                     f"{', '.join(extra[:5])}")
                return list(classes), {c: i for i, c in enumerate(classes)}

        from runx.trainers.recipe import RecipeConfigError
        try:   # an empty class folder keeps its label number (an eval split may lack a training class)
            self.ds = _Folder(root, allow_empty=True)
        except FileNotFoundError as e:   # torchvision: no class folder at all
            raise RecipeConfigError(f"data.path: {root} holds no images to read ({e}). Expected "
                                    f"<data.path>/<split>/<class>/<image>") from None
        if not self.ds.samples:
            raise RecipeConfigError(f"data.path: {root} holds no images to read (class folders "
                                    f"{', '.join(self.ds.classes[:5])} are empty or hold no image files). "
                                    f"Expected <data.path>/<split>/<class>/<image>")
        self.classes = self.ds.classes
        if classes is None:
            empty = sorted(set(self.classes) - {self.classes[t] for _, t in self.ds.samples})
            if empty:
                log.warning("%s: class folder(s) without images: %s (they keep their label numbers)", root,
                            ", ".join(empty[:5]))
        self.unreadable = 0

    def __len__(self):
        return len(self.ds)

    def get(self, i):
        """Image i, RGB; a file that cannot be decoded is skipped with a warning for the next readable one, so
        that one corrupt JPEG among millions does not end a run in its first epoch (as the data jobs skip and
        count bad records). Many in a row is a broken dataset: an error naming the last."""
        n = len(self.ds.samples)
        for k in range(min(n, 64)):
            path, label = self.ds.samples[(i + k) % n]
            try:
                return self.ds.loader(path), label
            except Exception as exc:   # noqa: BLE001 — PIL raises several types for a corrupt file
                self.unreadable += 1
                if self.unreadable <= 5:
                    log.warning("cannot read image %s (%s: %s): skipped, the next image is used in its place%s",
                                path, type(exc).__name__, exc, "" if self.unreadable < 5 else
                                " (further unreadable images in this process are skipped without a warning)")
                last = (path, exc)
        raise RuntimeError(f"cannot read image {last[0]} and the {min(n, 64) - 1} images after it either "
                           f"(last: {last[1]})") from last[1]


class HFImages:
    """A Hugging Face `datasets` split; images decoded to RGB PIL, labels from `label_field` (or -1)."""

    def __init__(self, ds, image_field: str, label_field: str, where: str):
        if image_field not in ds.column_names:
            raise KeyError(f"recipe.image_field={image_field!r} is not a column of {where} "
                           f"(columns: {ds.column_names})")
        self.ds, self.image_field, self.label_field, self.where = ds, image_field, label_field, where
        self.has_labels = label_field in ds.column_names

    def __len__(self):
        return len(self.ds)

    def get(self, i):
        row = self.ds[int(i)]
        img = row[self.image_field]
        if isinstance(img, dict) and img.get("bytes") is not None:
            import io
            from PIL import Image
            img = Image.open(io.BytesIO(img["bytes"]))
        if not hasattr(img, "convert"):
            raise TypeError(f"{self.where} row {i}: column {self.image_field!r} holds {type(img).__name__}, "
                            f"not an image")
        return img.convert("RGB"), int(row[self.label_field]) if self.has_labels else -1


def _load_hf_split(dcfg, split: str):
    import datasets
    if dcfg.path and os.path.isdir(dcfg.path) and os.path.exists(os.path.join(dcfg.path, "dataset_dict.json")):
        dd = datasets.load_from_disk(dcfg.path)
        if split not in dd:   # (a KeyError traceback at the data's first use)
            from runx.trainers.recipe import RecipeConfigError
            key = "data.train_split" if split == dcfg.train_split else "data.eval_split"
            raise RecipeConfigError(f"{key}={split}: not a split of {dcfg.path}. Valid choices: {', '.join(dd)}.")
        return dd[split]
    if dcfg.path and os.path.isdir(dcfg.path) and os.path.exists(os.path.join(dcfg.path, "dataset_info.json")):
        return datasets.load_from_disk(dcfg.path)
    name = dcfg.hf_name or dcfg.path
    if not name:
        raise ValueError("data.kind=hf needs data.hf_name (a hub id) or data.path (a save_to_disk folder)")
    from runx.trainers.hf import load_hub_dataset
    try:
        return load_hub_dataset("data.hf_name" if dcfg.hf_name else "data.path", name,
                                **{**dcfg.extra, "split": split})
    except ValueError as e:   # datasets' 'Unknown split "x". Should be one of [...]', a traceback before
        if not str(e).startswith("Unknown split") or os.environ.get("RUNX_TRACEBACK"):
            raise
        from runx.trainers.recipe import RecipeConfigError
        key = "data.train_split" if split == dcfg.train_split else "data.eval_split"
        valid = str(e).split("Should be one of", 1)[-1].strip(" .[]").replace("'", "")
        raise RecipeConfigError(f"{key}={split}: not a split of {name}. Valid choices: {valid}.") from None


class SyntheticCrops(Dataset):
    """n items of ready-made random uint8 crops (a bank of 32 distinct items, repeated): no decode, no
    augmentation, so the loader costs only the batch copy. For measuring the training step's throughput."""

    def __init__(self, n: int, rc, seed: int, bank: int = 32):
        g = torch.Generator().manual_seed(seed)
        sizes = [int(s) for n_c, s in zip(rc.nmb_crops, rc.size_crops) for _ in range(int(n_c))]
        self.bank = []
        for _ in range(bank):   # noise in a random intensity range per item, so that items look different
            lo, hi = sorted(torch.randint(0, 256, (2,), generator=g).tolist())
            self.bank.append([(lo + torch.rand(3, s, s, generator=g) * (hi - lo)).to(torch.uint8) for s in sizes])
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.bank[i % len(self.bank)], i % 10


def load_sources(cfg) -> tuple:
    """(train source, eval source, resize_for_eval) for the configured `data:` section."""
    d, rc = cfg.data, cfg.recipe
    size = int(rc.generated_image_size)
    if d.kind == "generated":
        if d.name in SHAPE_PALETTES:   # draw only what data.max_*_samples will keep
            seed, palette = int(cfg.seed), SHAPE_PALETTES[d.name]
            n_train = min(int(rc.generated_train_size), int(d.max_train_samples or 1 << 62))
            n_eval = min(int(rc.generated_eval_size), int(1 << 62 if d.max_eval_samples is None else d.max_eval_samples))
            train = generate_shapes(n_train, size, seed=10_007 + seed, palette=palette)
            test = generate_shapes(max(n_eval, 1), size, seed=20_011 + seed, palette=palette)  # (0: sliced off)
            return train, test, False
        if d.name == "digits":
            allimg = load_digits_images(size)
            perm = torch.randperm(len(allimg), generator=torch.Generator().manual_seed(int(cfg.seed)))
            n_eval = int(round(float(d.val_fraction) * len(allimg)))
            ev, tr = perm[:n_eval], perm[n_eval:]
            return (TensorImages(allimg.images[tr], allimg.labels[tr]),
                    TensorImages(allimg.images[ev], allimg.labels[ev]), False)
        if d.name == "synthetic":
            n_eval = min(int(rc.generated_eval_size), int(1 << 62 if d.max_eval_samples is None else d.max_eval_samples))
            images = torch.randint(0, 256, (n_eval, 3, int(rc.size_crops[0]), int(rc.size_crops[0])),
                                   dtype=torch.uint8, generator=torch.Generator().manual_seed(int(cfg.seed)))
            return None, TensorImages(images, torch.arange(n_eval) % 10), False
        raise ValueError(f"data.name={d.name!r} with data.kind=generated: valid choices are "
                         f"{', '.join(SHAPE_PALETTES)}, digits, synthetic")
    if d.kind == "imagefolder":
        if d.eval_split == d.train_split:
            log.warning("data.eval_split=%s is the training split: the kNN / linear-probe accuracies are measured on "
                        "the images the probe is fitted to, so they read high", d.eval_split)
        train = FolderImages(os.path.join(d.path, d.train_split))
        return train, FolderImages(os.path.join(d.path, d.eval_split), classes=train.classes), True
    if d.kind == "hf":
        where = d.hf_name or d.path
        return (HFImages(_load_hf_split(d, d.train_split), rc.image_field, d.label_field, f"{where}[{d.train_split}]"),
                HFImages(_load_hf_split(d, d.eval_split), rc.image_field, d.label_field, f"{where}[{d.eval_split}]"),
                True)
    raise ValueError(f"data.kind={d.kind!r} for recipe=swav: valid choices are generated (data.name=shapes|digits), "
                     f"imagefolder, hf")


def subset(n: int | None, total: int, seed: int, what: str) -> list[int]:
    """Indices of n of `total` items (all, in order, for n None or >= total): a random draw seeded from (seed,
    what), in index order. Not the first n: torchvision's ImageFolder lists images class by class (and many hub
    datasets are sorted by label too), so the first 4000 ImageNet images are 3 classes, and a kNN / linear probe
    fitted on them, or a training subset, sees only those. The same on every rank and across a resume."""
    if n is None or int(n) >= total:
        return list(range(total))
    g = torch.Generator().manual_seed(seed_of("swav-subset", what, int(seed)))
    return sorted(torch.randperm(total, generator=g)[:max(0, int(n))].tolist())
