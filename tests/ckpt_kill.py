"""Run as a script: save step 1, then die by SIGKILL in the middle of saving step 2."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))
import zero_adam.checkpoint as ckpt  # noqa: E402
from zero_adam import ZeroAdamW  # noqa: E402

from _models import batch, loss_fn, make_model, named_groups  # noqa: E402

root, where = sys.argv[1], sys.argv[2]
model = make_model()
opt = ZeroAdamW(named_groups(model), lr=1e-2)
loss_fn(model, *batch(0, 8)).backward()
opt.step()
ckpt.save(os.path.join(root, "step_1"), model, opt, extra={"step": 1})
loss_fn(model, *batch(1, 8)).backward()
opt.step()


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


if where == "before_meta":       # every data file written, the completion marker not yet
    ckpt.write_meta = die
else:                            # while DCP is writing the data files
    import torch.distributed.checkpoint.filesystem as fs
    fs._write_item = die
ckpt.save(os.path.join(root, "step_2"), model, opt, extra={"step": 2})
print("not killed")
