"""The local imitation of Google Cloud Batch: the REST API the real client speaks (``service``),
jobs as host processes (``runner``), the pure rules (``model``) and injected failures (``faults``)."""
