"""Shared defaults of the scene cases (not run by itself): 128x128 canvases, answered by the
dense detector (`config.head = "dense"`) or by K slots (`--config.head=slots`).

Each case file imports `get_config` from here and changes a few fields.
"""

import ml_collections

from experiments.configs import digit


def get_config() -> ml_collections.ConfigDict:
  config = digit.get_config()
  config.canvas_size = 128  # the cases' larger canvas
  config.num_val = 10_000  # validation scenes, drawn from the MNIST test digits (fixed key)
  # Slot heads only (head = "slots"): box MSE x10; at weight 1 the count and class losses
  # drive the shared features and the boxes stall at the mean (docs/results.md)
  config.box_loss_weight = 10.0
  config.ema_decay = 0.0  # no moving average of the weights
  # Dense detector: a cosine schedule from a 3x higher peak than the seed's constant 1e-3
  config.learning_rate = 3e-3
  config.lr_schedule = "cosine"
  config.warmup_steps = 50
  config.head = "dense"  # "dense": per-cell heatmap + box (jaxloc.dense); "slots": K slot heads
  config.dense = ml_collections.ConfigDict()
  dn = config.dense
  # "single": the seed's conv stages and context convs at one stride; "fpn": the stages
  # continued by `pyramid_features` to stride 32 and a top-down neck back to `stride`
  # (jaxloc.model.DenseDetector; chosen per config by measurement, README)
  dn.backbone = "single"
  dn.pyramid_features = (128, 128)  # fpn: conv + pool stages past conv_features (stride 16, 32)
  dn.neck_features = 128  # fpn: channels of the 1x1 laterals and the top-down sum
  dn.norm = "none"  # "group": GroupNorm after every 3x3 conv; "batch": BatchNorm
  dn.stride = 8  # canvas pixels per heatmap cell (a power of two; 2 ** pooled conv stages)
  # 3x3 convs at the output stride (receptive field 54 px); 128 wide beat 64 (docs/results.md)
  dn.context_features = (128, 128)
  dn.top_k = 100  # detections decoded per canvas (COCO's maxDets); must be >= max_objects
  # A detection with this score or more is an answer (count, presence); chosen on training
  # scenes with `python -m experiments.threshold` (docs/results.md)
  dn.score_threshold = 0.15
  dn.heatmap_loss_weight = 1.0  # weight of the focal heatmap loss
  dn.box_loss_weight = 1.0  # weight of the L1 box loss (offset and log size, cell units)
  dn.giou_loss_weight = 0.0  # weight of 1 - GIoU of the decoded box (0: off)
  dn.prior = 0.01  # initial heatmap probability of every cell (sets the heatmap bias)
  # Datasets on disk (jaxloc.datasets: an MNIST-detection folder or COCO JSON) in place of
  # the synthetic scenes: "" = draw scenes from MNIST (training: fresh every step).
  config.data = ml_collections.ConfigDict()
  config.data.train_path = ""  # training set, read in keyed passes (each image once a pass)
  config.data.val_path = ""  # validation set (its first num_val images)
  # A COCO file's images: "" = beside the JSON, then in images/ beside it; else this folder
  config.data.image_root = ""
  config.scene = ml_collections.ConfigDict()
  sc = config.scene
  sc.max_objects = 2  # K: object slots per canvas
  sc.count_probs = (1 / 3, 1 / 3, 1 / 3)  # P(count = 0), P(count = 1), ..., P(count = K)
  sc.target_class = -1  # >= 0: only digits of this class are objects
  sc.distractor_prob = 0.0  # with target_class: P(an empty canvas shows another digit)
  sc.size_range = (28, 28)  # side of each digit on the canvas, px (inclusive range)
  # "patch": the pasted square (the seed's box); "tight": the 28x28 ink extent scaled; "ink":
  # the resized digit's pixels > 0 on the canvas (the MNIST-detection generator's box)
  sc.box_type = "patch"
  sc.paste_mode = "max"  # overlapping ink: "max" (the brighter pixel) or "add" (sum, clip at 1)
  sc.max_overlap = 0.0  # largest IoU allowed between two digits' patches
  sc.classify = True  # predict each digit's class (False: presence / boxes only)
  sc.count_loss_weight = 1.0  # slots only: weight of the count cross-entropy
  sc.objectness_loss_weight = 1.0  # slots only: weight of the per-slot objectness BCE
  return config
