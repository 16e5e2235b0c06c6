"""Real faults for a ``python -m clipexp`` process that tests start with this folder first on ``PYTHONPATH``.

Python imports ``sitecustomize`` at start-up; this one does nothing unless one of these is set:

* ``CLIPEXP_TEST_SIGNAL=SIGINT@13``: during optimizer step 13 (after the update, before the step is done) the
  process sends itself that signal with ``os.kill``, as a user's Ctrl-C or a scheduler's SIGTERM arrives mid-step;
  the step is known, so the test knows where the run must stop.
* ``CLIPEXP_TEST_DISK_FULL=<name>@<n>:<bytes>``: the ``n``-th ``torch.save`` whose target's file name contains
  ``name`` runs under ``RLIMIT_FSIZE=<bytes>`` (``SIGXFSZ`` ignored): the kernel refuses every write past that size
  (``EFBIG``), as a full disk refuses it (``ENOSPC``); torch's own writer fails as it does then. The limit is lifted
  once that write has failed (the space that was not there is not needed by the rest of the process).
"""

import os

_signal = os.environ.get("CLIPEXP_TEST_SIGNAL")
_disk = os.environ.get("CLIPEXP_TEST_DISK_FULL")

if _signal:
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    _name, _, _at = _signal.partition("@")
    _steps = [0]

    def _send(optimizer, args, kwargs):
        _steps[0] += 1
        if _steps[0] == int(_at):
            os.kill(os.getpid(), getattr(signal, _name))

    register_optimizer_step_post_hook(_send)

if _disk:
    import resource
    import signal

    import torch

    _target, _, _rest = _disk.partition("@")
    _nth, _, _bytes = _rest.partition(":")
    _seen = [0]
    _real_save = torch.save

    def _save(obj, f, *args, **kwargs):
        if _target not in os.path.basename(str(f)):
            return _real_save(obj, f, *args, **kwargs)
        _seen[0] += 1
        if _seen[0] != int(_nth):
            return _real_save(obj, f, *args, **kwargs)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        before = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(_bytes), before[1]))
        try:
            return _real_save(obj, f, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, before)

    torch.save = _save
