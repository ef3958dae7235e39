"""Gradient jobs: guided backprop, DeepDream and neural style transfer in PyTorch gradient processes.

The rooms, and the way their imports run (docs/SERVICE_INTERFACES.md, "Gradient jobs"):

- the job interface, torch-free leaves: `params.py` (explain methods, DeepDream and style
  parameters, caps, geometry) <- `jobs.py` (jobs, results, progress updates, `validate_job`,
  `estimate_cost`). The serving process builds, checks and prices jobs with them without PyTorch;
  `rendering.py` turns arrays into PNGs.
- the serving-process side: `pool.py` (the `GradientPool`: submit, dispatch, deadlines,
  cancellation) <- `admission.py` (cost budget, crash ledger) and `supervisor.py` (spawn, Ready
  handshake, reaping, respawn; reusable, knows nothing about jobs) <- `child.py` (the pipe protocol,
  `JobContext` and the child's main loop). The pool knows nothing about the algorithms.
- the child side, run in each gradient process by name: `loading.py` (`load_models`, the
  initializer, which runs the start-up parity self-test in `parity.py`'s short-lived process) and
  `handlers.py` (`handle`, the handler), which call the algorithms
  `guided_backprop.py`, `deepdream.py` and `style_transfer.py` on plain tensors; those share
  `model_state.py` and take their parameters from `params.py`, never from the handlers.

Only the child side imports torch, and only inside its functions where the serving process imports
the module (loading.py, handlers.py): the serving process never loads PyTorch.
"""
