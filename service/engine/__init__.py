"""The training engine: built-in models and data sets, the Ray Train loop, per-layer statistics, run control.

- `models`, `data`: what is trained on what (plain BatchNorm models; digits, synthetic or npz data);
- `optimization`, `convergence`: optimizers, learning-rate schedules, verdicts and early stopping;
- `train_loop`: the function every Ray Train worker runs;
- `reports`, `recording_callback`, `recorder`: worker reports -> merged records -> the per-job record log;
- `runner`: launch / attach / cancel a run (`launch_run`, `attach_run`, `JobRun`);
- `cluster`: `ensure_ray` and `cluster_capacity`.
"""
