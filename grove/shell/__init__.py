"""The shell: the CLI and what its commands run (local runs, warm runner, server, stack, deploy, store
housekeeping, adapter commands). Imports every layer below; nothing imports it."""
