"""Run train_accelerate.py on CPU processes with Accelerate's FSDP path forced on (test only).

Accelerate 1.15 chooses DistributedType.FSDP only for launches on accelerator devices
(`AcceleratorState.__init__` in accelerate/state.py sets it from the MULTI_GPU/MULTI_XPU/... branch,
never from MULTI_CPU), so an FSDP launch on CPU silently trains with DDP. This file does what that
branch does (distributed_type FSDP, the plugin with its mixed precision, and the shared PartialState's
distributed_type, as the end of that __init__ sets it) for a MULTI_CPU launch that asks for FSDP, then
runs the trainer unchanged:

    accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml --num_processes 2 \
        --mixed_precision no tests/fsdp_on_cpu.py [trainer flags]

Everything else (fully_shard, the sharded checkpoints, get_state_dict) is Accelerate's and torch's own code.
"""

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        # what AcceleratorState.__init__ does for MULTI_GPU launches (accelerate/state.py, 1.15)
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    trainer = Path(__file__).resolve().parents[1] / "train_accelerate.py"
    sys.path.insert(0, str(trainer.parent))
    sys.argv[0] = str(trainer)
    runpy.run_path(str(trainer), run_name="__main__")
