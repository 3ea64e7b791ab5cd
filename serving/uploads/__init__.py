"""Uploaded datasets: ``POST /v1/files`` and its siblings (OpenAI's files API).

- ``archive``: a zip or tar unpacked safely (names, links, sizes, ratio, counts);
- ``store``: ``FileStore`` — streamed to staging, unpacked, validated by ``training.data``, moved into place;
- ``routes``: the HTTP side (multipart streamed by python-multipart, OpenAI's bodies and statuses).
"""
