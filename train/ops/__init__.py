"""Operations at scale: exit codes and how a failure is reported (errors.py), the run-dir lock (lock.py),
and the run-time guards of the training loop (the rest of this package)."""
