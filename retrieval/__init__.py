"""Stored GSU results: ``muse retrieve`` runs a model's pipeline GSU once over a prepared dataset (``run``), writes
per sample what the ESU reads (``store``), and the trainer builds its batches from them (``stage``) instead of
reading and scoring whole histories, the paper's deployment of the GSU off the ranker's critical path."""
