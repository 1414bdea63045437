"""COCO AP by pycocotools (the [dev] extra) of COCO JSON as `jaxloc.metrics.coco_json` and a
run's ground_truth.json / detections.json hold it: the experiment scripts' one use of it."""

import contextlib
import io

from jaxloc.errors import UserError

NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium")  # no digit is "large" (> 96^2 px)


def stats(gt: dict, detections: list) -> dict[str, float]:
  """pycocotools' AP over all, small and medium boxes (-1 where a size has no box)."""
  try:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
  except ImportError:
    raise UserError("pycocotools is not installed: pip install -e '.[dev]'") from None
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    result = COCOeval(coco, coco.loadRes(detections) if detections else COCO(), "bbox")
    result.evaluate()
    result.accumulate()
    result.summarize()
  return {k: float(v) for k, v in zip(NAMES, result.stats[:5], strict=True)}
