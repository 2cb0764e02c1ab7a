"""From a changed file to a durable object: tracker and filters, planner, uploader, ledger,
retry queue and engine; orphan cleanup, pruning, and restore back the other way."""
