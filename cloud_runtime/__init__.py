"""The FedGKT cloud runtime: server training, soft labels back to devices, evaluation, orchestration."""
