"""Detection datasets on disk, in the two formats MNIST detection data travels in.

- `mnist_detection`: the folder of the MNIST-detection generator
  (github.com/hukkelas/MNIST-ObjectDetection, NTNU TDT4265): `images/<i>.png` (8-bit grey)
  and `labels/<i>.txt`, a header line `label,xmin,ymin,xmax,ymax`, then one digit per line
  in integer pixels (xmax, ymax exclusive: jaxloc's convention).
- `coco`: a COCO JSON file (`images` with `id`, `file_name`, `width`, `height`;
  `annotations` with `image_id`, `category_id` = the digit, `bbox` = [x, y, w, h] in
  pixels). A folder holding `annotations.json` (what `write` makes) or the JSON file itself
  may be given. Each `file_name` is looked for beside the JSON, then in `images/` beside it
  (the layouts exporters write), or, given `image_root`, there only (COCO's own layout
  keeps `annotations/instances_val2017.json` apart from `val2017/`).

`read(path)` tells the two apart by what the folder holds (`labels/` first) or takes
`format=`; `write(out_dir, ...)` writes both at once, over the same PNGs. A set in memory
is a `Dataset` of numpy arrays: images uint8 [N, H, W] (colour read as grey, as
`jaxloc.images.read_grey`), box float32 [N, K, 4] normalised xyxy (`jaxloc.boxes`), label
int32 [N, K], valid bool [N, K], K = the largest count in the set (at least 1). Anything
wrong in the files is one `UserError` naming the file and what is wrong.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image

from jaxloc import images as image_files
from jaxloc import workdir
from jaxloc.errors import UserError

FORMATS = ("mnist_detection", "coco")
COCO_FILE = "annotations.json"
HEADER = "label,xmin,ymin,xmax,ymax"


class Dataset(NamedTuple):
  images: np.ndarray  # uint8 [N, H, W]
  box: np.ndarray  # float32 [N, K, 4], normalised xyxy
  label: np.ndarray  # int32 [N, K] (0 where not valid)
  valid: np.ndarray  # bool [N, K]

  @property
  def canvas_size(self) -> int:
    return int(self.images.shape[1])


def detect_format(path: str) -> str:
  if os.path.isfile(path) and path.endswith(".json"):
    return "coco"
  if not os.path.isdir(path):
    raise UserError(f"dataset {path!r} not found (give a folder, or a COCO .json file)")
  if os.path.isdir(os.path.join(path, "labels")):
    return "mnist_detection"
  if os.path.isfile(os.path.join(path, COCO_FILE)):
    return "coco"
  raise UserError(
    f"{path}: neither an MNIST-detection folder (images/ and labels/) nor a COCO folder "
    f"({COCO_FILE}); give one, or a COCO .json file"
  )


def read(path: str, format: str | None = None, image_root: str = "") -> Dataset:
  """The dataset at `path` (a folder, or a COCO .json file) as arrays; `image_root`: the
  folder of a COCO file's images, if not beside it or in its images/ folder."""
  format = format or detect_format(path)
  if format not in FORMATS:
    raise UserError(f"dataset format {format!r}: use one of {FORMATS}")
  if format == "mnist_detection":
    files, sources, objects = _read_mnist_detection(path)
  else:
    files, sources, objects = _read_coco(path, image_root)
  if not files:
    raise UserError(f"{path}: the dataset holds no images")
  return _assemble(sources, objects, _read_images(files))


def _read_mnist_detection(path: str):
  image_dir, label_dir = os.path.join(path, "images"), os.path.join(path, "labels")
  if not os.path.isdir(image_dir):
    raise UserError(f"{path}: no images/ folder beside labels/")
  stems = sorted(
    (os.path.splitext(f)[0] for f in os.listdir(label_dir) if f.endswith(".txt")), key=_natural
  )
  pngs = {os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.endswith(".png")}
  for stem in sorted(pngs - set(stems), key=_natural)[:1]:
    raise UserError(f"{os.path.join(label_dir, stem + '.txt')}: missing (its image exists)")
  files, sources, objects = [], [], []
  for stem in stems:
    image, labels = os.path.join(image_dir, stem + ".png"), os.path.join(label_dir, stem + ".txt")
    if stem not in pngs:
      raise UserError(f"{image}: missing (its label file exists)")
    files.append(image)
    sources.append(labels)
    objects.append(_parse_labels(labels))
  return files, sources, objects


def _natural(stem: str):
  """0, 1, 2, ..., 10 (numbered files in number order), other names after them."""
  return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _parse_labels(path: str) -> list[tuple[int, float, float, float, float]]:
  with open(path) as f:
    lines = [line.strip() for line in f]
  if not lines or lines[0].replace(" ", "") != HEADER:
    raise UserError(f"{path}: line 1 must be the header {HEADER!r}")
  out = []
  for n, line in enumerate(lines[1:], start=2):
    if not line:
      continue
    parts = line.split(",")
    try:
      if len(parts) != 5:
        raise ValueError
      label, x0, y0, x1, y1 = (int(p) for p in parts)
    except ValueError:
      raise UserError(f"{path}, line {n}: {line!r} is not {HEADER} in integers") from None
    out.append((label, x0, y0, x1, y1))
  return out


def _read_coco(path: str, image_root: str = ""):
  json_path = os.path.join(path, COCO_FILE) if os.path.isdir(path) else path
  try:
    data = workdir.read_json(json_path)
    images = {int(im["id"]): im["file_name"] for im in data["images"]}
    annotations = [
      (int(a["image_id"]), int(a["category_id"]), [float(v) for v in a["bbox"]])
      for a in data["annotations"]
    ]
  except FileNotFoundError:
    raise UserError(f"{json_path}: not found") from None
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"{json_path}: not a COCO detection file ({type(e).__name__}: {e})") from None
  here = os.path.dirname(json_path)
  roots = [image_root] if image_root else [here, os.path.join(here, "images")]
  ids = sorted(images)
  row = {image_id: i for i, image_id in enumerate(ids)}
  objects = [[] for _ in ids]
  for image_id, category, (x, y, w, h) in annotations:
    if image_id not in row:
      raise UserError(f"{json_path}: an annotation refers to image_id {image_id}, not in images")
    objects[row[image_id]].append((category, x, y, x + w, y + h))
  sources = [f"{json_path} (image {images[i]})" for i in ids]
  return [_find_image(images[i], roots, json_path) for i in ids], sources, objects


def _find_image(file_name: str, roots: list[str], json_path: str) -> str:
  """The first of `roots`/`file_name` that exists; a UserError naming each place looked."""
  tried = [os.path.join(root, file_name) for root in roots]
  for path in tried:
    if os.path.isfile(path):
      return path
  raise UserError(
    f"{json_path}: image {file_name!r} not found at {' or '.join(tried)}; give the folder "
    "that holds the images (evaluate --image_root, config.data.image_root)"
  )


def _read_images(files: list[str]) -> np.ndarray:
  """uint8 [N, H, W]; decoded on a few threads (Pillow releases the GIL while decoding)."""
  with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    grey = list(pool.map(image_files.read_grey, files))
  shape = grey[0].shape
  for path, g in zip(files, grey, strict=True):
    if g.shape != shape:
      raise UserError(
        f"{path}: {g.shape[1]}x{g.shape[0]} pixels, but {files[0]} is {shape[1]}x{shape[0]}; "
        "every image of a dataset must have one size"
      )
  if shape[0] != shape[1]:
    raise UserError(f"{files[0]}: {shape[1]}x{shape[0]} pixels; jaxloc's canvases are square")
  return np.stack(grey)


def _assemble(sources, objects, images_NxHxW) -> Dataset:
  """The arrays; `sources[i]` names where image i's boxes came from (for errors)."""
  n, size = len(sources), images_NxHxW.shape[1]
  k = max(1, max(len(o) for o in objects))
  box = np.zeros((n, k, 4), np.float32)
  label = np.zeros((n, k), np.int32)
  valid = np.zeros((n, k), bool)
  for i, (path, objs) in enumerate(zip(sources, objects, strict=True)):
    for j, (c, x0, y0, x1, y1) in enumerate(objs):
      if not 0 <= c <= 9:
        raise UserError(f"{path}: class {c} of digit {j + 1} is outside 0-9")
      if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise UserError(
          f"{path}: box ({x0}, {y0}, {x1}, {y1}) of digit {j + 1} is empty or outside the "
          f"{size}x{size} image (xmin < xmax, ymin < ymax, within 0..{size})"
        )
      box[i, j], label[i, j], valid[i, j] = np.array([x0, y0, x1, y1]) / size, c, True
  return Dataset(images=images_NxHxW, box=box, label=label, valid=valid)


def write(out_dir: str, data: Dataset) -> None:
  """Writes `data` in both formats into `out_dir`: images/<i>.png, labels/<i>.txt and
  annotations.json (COCO, the same PNGs). Boxes are whole pixels: each box is rounded
  outwards (min down, max up), which leaves boxes already on whole pixels as they are."""
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise UserError(f"{out_dir} exists and is not empty; give a new folder")
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "labels"), exist_ok=True)
  size = data.canvas_size
  px = pixel_boxes(data.box, size)
  coco = {
    "images": [],
    "annotations": [],
    "categories": [{"id": c, "name": str(c)} for c in range(10)],
  }

  def write_one(i):
    Image.fromarray(data.images[i]).save(os.path.join(out_dir, "images", f"{i}.png"))
    rows = [HEADER] + [
      f"{data.label[i, j]}," + ",".join(str(int(v)) for v in px[i, j])
      for j in np.nonzero(data.valid[i])[0]
    ]
    with open(os.path.join(out_dir, "labels", f"{i}.txt"), "w") as f:
      f.write("\n".join(rows) + "\n")

  with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    list(pool.map(write_one, range(len(data.images))))
  for i in range(len(data.images)):
    coco["images"].append({"id": i, "file_name": f"images/{i}.png", "width": size, "height": size})
    for j in np.nonzero(data.valid[i])[0]:
      x0, y0, x1, y1 = (int(v) for v in px[i, j])
      coco["annotations"].append(
        {
          "id": len(coco["annotations"]) + 1,
          "image_id": i,
          "category_id": int(data.label[i, j]),
          "bbox": [x0, y0, x1 - x0, y1 - y0],
          "area": (x1 - x0) * (y1 - y0),
          "iscrowd": 0,
        }
      )
  with open(os.path.join(out_dir, COCO_FILE), "w") as f:
    json.dump(coco, f)


def pixel_boxes(box_NxKx4: np.ndarray, canvas_size: int) -> np.ndarray:
  """Normalised boxes as whole pixels, int64, rounded outwards (to float error: a box on
  whole pixels stays as it is)."""
  px = np.asarray(box_NxKx4, np.float64) * canvas_size
  lo = np.floor(np.round(px[..., :2], 3))
  hi = np.ceil(np.round(px[..., 2:], 3))
  return np.concatenate([lo, hi], axis=-1).astype(np.int64)
