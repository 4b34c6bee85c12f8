"""The seam to vLLM 0.32.0: the only modules of the package that import vLLM's internals.

- :mod:`~fastkvzip_press.vllm.seam.config`: engine configuration (refusals, settings, gates and events checked before
  any engine process starts; the engine pointed at the scheduler, worker and request check below), the one patch.
- :mod:`~fastkvzip_press.vllm.seam.scheduler`: the ``scheduler_cls``.
- :mod:`~fastkvzip_press.vllm.seam.worker`: the ``worker_cls`` and its model runner.
- :mod:`~fastkvzip_press.vllm.seam.backend`: the attention backend (vLLM's registry).
- :mod:`~fastkvzip_press.vllm.seam.http`: the ``vllm serve`` middleware for misplaced request keys.

Everything they call is engine-independent (:mod:`fastkvzip_press.vllm` and the core).
"""
