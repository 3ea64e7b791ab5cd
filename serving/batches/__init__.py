"""Batch generation: OpenAI's Batch API (``/v1/batches``) for ``POST /v1/images/generations`` requests.

- ``inputs``: the JSONL input file (``POST /v1/files``, ``purpose=batch``), validated line by line on upload, and
  the output/error files a batch writes (``purpose=batch_output``, read with ``GET /v1/files/{id}/content``);
- ``store``: ``BatchStore`` — each batch's record and progress on disk, so a restarted runner resumes;
- ``runner``: ``BatchRunner`` — feeds the requests to the generator replicas as low-priority work (plain asyncio);
- ``routes``: the HTTP side, called by ``serving.http``'s ingress;
- ``deployment``: the one-replica Ray Serve deployment the runner lives in.
"""
