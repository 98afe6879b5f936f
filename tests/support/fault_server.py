"""``ragllm serve`` with faults injected into its engine, for isolation tests (run as a script).

The faults are wired in here, by wrapping the engine's own functions before the server starts; the
service itself carries no fault hooks. A request chooses its fault through its ``seed``:

- ``SAMPLING_FAULT_SEED``: choosing this request's tokens raises from its third token on (the fault
  of one sequence: its sampling), whether the row is sampled in a batch or alone;
- ``DEVICE_FAULT_SEED``: every decode step raises once this request is decoding (a fault of no
  sequence in particular, as a device error is);
- ``HANG_FAULT_SEED``: the engine's next decode step never returns (a hung device).

Usage: ``python -m tests.support.fault_server [ragllm serve flags...]``.
"""

from __future__ import annotations

import sys
import time

SAMPLING_FAULT_SEED = 666_013
DEVICE_FAULT_SEED = 666_017
HANG_FAULT_SEED = 666_023
FAULT_AFTER_TOKENS = 2


def _install_faults() -> None:
    from ragllm.engines.inprocess import worker
    from ragllm.engines.inprocess.sample import choice as sampling
    from ragllm.engines.inprocess.sample import sampler

    calls: dict[int, int] = {}

    def faulty_rows(params) -> bool:
        for p in params:
            if p.seed == SAMPLING_FAULT_SEED:
                calls[id(p)] = calls.get(id(p), 0) + 1
                if calls[id(p)] > FAULT_AFTER_TOKENS:
                    return True
        return False

    def wrap_sampler(sample):
        def sampler_with_fault(logits, params, *args, **kwargs):
            if faulty_rows(params):
                raise FloatingPointError("injected fault: probabilities are not finite")
            return sample(logits, params, *args, **kwargs)

        return sampler_with_fault

    # The sampler's batched choice, and the row-by-row retry in the sampling module.
    sampler.sample_next_tokens = wrap_sampler(sampler.sample_next_tokens)
    sampler.sample_on_device = wrap_sampler(sampler.sample_on_device)
    sampling.sample_next_tokens = wrap_sampler(sampling.sample_next_tokens)

    decode = worker.Worker._decode

    def decode_with_fault(self, decoding, results):
        running = self.scheduler.running
        if any(s.params.seed == DEVICE_FAULT_SEED and s.prefill_done for s in running):
            raise RuntimeError(
                "injected fault: CUDA error: an illegal memory access was encountered"
            )
        if any(s.params.seed == HANG_FAULT_SEED and s.prefill_done for s in running):
            time.sleep(3600)
        return decode(self, decoding, results)

    worker.Worker._decode = decode_with_fault


def main() -> int:
    _install_faults()
    from ragllm.cli import main as ragllm_main

    return ragllm_main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
