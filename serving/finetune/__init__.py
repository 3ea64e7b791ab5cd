"""OpenAI's fine-tuning jobs API over lorafleet's pipeline: job records (jobs.py), admission (queue.py), routes."""
