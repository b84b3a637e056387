"""Optional integrations (import them explicitly; the core imports none of them):

* ``zero_adam.integrations.accelerate``: use ZeroAdamW in a Hugging Face Accelerate loop.
* ``zero_adam.integrations.transformers``: ``ZeroAdamTrainer``, ``transformers.Trainer`` with ZeroAdamW.
* ``zero_adam.integrations.deepspeed``: migrate a DeepSpeed ZeRO-1/2 checkpoint to zero-adam.
"""
