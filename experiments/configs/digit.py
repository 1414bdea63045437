"""The seed's protocol: one MNIST digit on a 75x75 canvas, class + box.

Run:  python -m experiments.train --config=experiments/configs/digit.py --workdir=runs/digit
Override any field: --config.epochs=3 --config.batch_size=128

Batch 64, 10 epochs of 60000 // 64 = 937 steps, Adam 1e-3, cross-entropy + MSE 1:1,
evaluated on one canvas per MNIST test digit. On ../shared/data/mnist (5,000
training digits) it reaches the numbers in the README.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # root PRNG seed: parameter init and every training batch
  config.val_seed = 0  # seed of the fixed validation layout (independent of `seed`)
  config.mnist_dir = ""  # IDX directory; "" = $JAXLOC_MNIST_DIR, else TFDS download
  config.canvas_size = 75  # canvas side in pixels (digits are 28x28)
  config.batch_size = 64  # canvases per training step
  config.epochs = 10  # evaluations happen at the end of each epoch
  config.steps_per_epoch = 60000 // 64  # the seed's epoch: 60,000 canvases
  config.steps_per_call = -1  # steps per compiled call: N > 1 loops over N steps; -1 = per backend
  config.learning_rate = 1e-3  # Adam step size (the peak of a schedule)
  config.lr_schedule = "constant"  # "constant" (the seed), or "cosine": warm-up, decay to 0
  config.warmup_steps = 0  # cosine only: steps of linear warm-up from 0
  config.class_loss_weight = 1.0  # weight of the softmax cross-entropy
  config.box_loss_weight = 1.0  # weight of the box MSE
  # Decay of an exponential moving average of the weights, kept beside them (0 = none). Training
  # never reads it; with it, the run evaluates and exports the average and also reports the
  # raw weights' figures (`raw` in metrics.json), which are the seed's.
  config.ema_decay = 0.999
  config.conv_features = (16, 32, 64)  # channels of the three conv stages
  config.dense_features = 128  # width of the shared dense layer
  config.eval_batch_size = 500  # canvases per evaluation batch (bounds memory)
  config.num_val = -1  # validation canvases: the first N test digits (-1 = all)
  config.log_every = 100  # steps between metrics.jsonl records
  config.num_plot = 16  # validation canvases drawn in predictions.png (0: none)
  config.checkpoint_every = 500  # steps between Orbax checkpoints (one more at the end)
  config.keep_checkpoints = 3  # most recent checkpoints kept in workdir/checkpoints
  # Replicas: N members (seeds seed, seed + 1, ...) trained in one compiled program, each
  # with a workdir `member-<i>/`; summary.json holds mean / std / min / max of the figures.
  config.replicas = 1
  config.replica_mode = "auto"  # "vmap" | "map" (lax.map) | "auto": per backend, replicas.py
  # Hyperparameters listed per member, e.g. "learning_rate=1e-3,3e-3 ema_decay=0.99,0.999":
  # one value per member for each field named (jaxloc.tasks.hyperparameters says which)
  config.vary = ""
  return config
