"""The speed benchmark behind ``tools/benchmark.py``: this project and effdet measured side by side.

``python tools/benchmark.py task=detection backbone=b0 device=cuda compare=effdet`` (see configs/benchmark.yaml)
prints one JSON line per measurement and a table. Measurements:

- ``params``: parameter count; ``flops``: multiply-adds x 2 of one forward pass of one image
  (``torch.utils.flop_counter``: convolutions and matrix products);
- ``agreement`` (with ``compare=effdet``): effdet's randomly initialised (or ``effdet_checkpoint``) weights are
  converted into this project's model and both predict the same float32 input; the line gives the largest
  class-logit difference and how many detections agree;
- ``predict``: images/s at ``batch_size``, model + decoding + NMS, with the fast paths (``fast.*``);
- ``latency``: milliseconds for one image, the same pipeline;
- ``latency_ort``, ``latency_ort_int8`` (CPU): milliseconds for one image of the model exported as
  ``tools/export.py`` exports it (post-processing inside the graph), float32 or int8 (calibrated on random images),
  in ONNX Runtime with torch's thread count, on the ``latency`` measure's image; with ``compare=effdet`` timed
  alternately with effdet's PyTorch float32 predict call, ``ratio`` to that; the rows give the files' sizes;
- ``data``: images/s of the training data pipeline (read, decode, augment at the model resolution or, for
  segmentation, the training crop, collate into uint8 batches; normalisation happens on the device) with each of
  ``data_workers`` loader workers, and per worker (use ``data=synthetic`` or your own data; no model is involved);
- ``train``: images/s of a training step at ``train_batch_size`` (forward, target assignment, loss, backward,
  SGD step; detection with ``train_boxes`` random boxes per image; segmentation: forward, the task's loss on
  label-sized logits, backward, SGD step), with bf16 autocast / channels-last / compilation as configured (norms
  are not folded in training). The training measures (``train``, ``fit`` and the step of ``ops``) run at
  ``train_image_size``: by default the size training runs at, the model's resolution for detection and the
  training crop (``data.crop_size``) for segmentation, or ``image_size`` when that is given;
- ``ops`` (any device, eager): tensor operations dispatched by one predict call (at ``batch_size``) and by one
  training step (at ``train_batch_size``), forward and backward, views and allocations not counted, and how many
  of them synchronise with the host. On a GPU each operation is at least one kernel launch, so where the CPU
  cannot launch as fast as the GPU computes (small maps, fast GPUs) these counts, not FLOPs, set the step time;
- ``fit``: images/s of the Lightning training loop that ``tools/train.py`` runs (the task's training step with
  its optimizer and learning-rate schedule, gradient clipping, the EMA of the weights, logging) at
  ``train_batch_size``, on one in-memory batch moved to the device every step (the ``data`` measure covers the
  loader), and the operations and host synchronisations of one whole step; ``vs_train`` is its time over the
  bare ``train`` step's when both are measured (the loop's overhead), and ``ratio`` its time over effdet's bare
  ``train`` step's (effdet has no trainer; with ``compare=effdet`` and ``fit`` but not ``train``, effdet's step is
  measured alone for it, so this project's network is not compiled a second time for a bare step);
  ``task.module.compile`` follows ``fast.compile``, and ``task.module.cuda_graph=true`` measures the loop with the
  captured training step (CUDA only; with ``fast.compile`` on, the step captures the compiled network).

Both implementations run in the same process on the same input, batch and precision, alternating in
``rounds`` so that a machine's drift hits both; ``ratio`` is this project's time over effdet's (below 1 is
faster). effdet gets the generic paths that apply to it too (channels-last, autocast, torch.compile of its
network; its own post-processing and anchor labeller as they are).

Where things live: :mod:`benchmarks.harness` (``run_benchmark``: the request's checks and the walk over
:data:`benchmarks.measures.MEASURES`), :mod:`benchmarks.options` (options and their checks),
:mod:`benchmarks.context` (what the measures share), :mod:`benchmarks.measures` (one function per measure),
:mod:`benchmarks.timing`, :mod:`benchmarks.ops` (operation counting), :mod:`benchmarks.train_step`,
:mod:`benchmarks.fit`, :mod:`benchmarks.data_measure`, :mod:`benchmarks.onnx_measure`, :mod:`benchmarks.effdet_ref` (the reference model),
:mod:`benchmarks.calibration`, :mod:`benchmarks.report` (table, JSON lines, environment).
"""
