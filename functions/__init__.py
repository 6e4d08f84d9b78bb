"""Cloud Function source (deployable with `gcloud functions deploy --source functions/`). Also
shipped inside the wheel as ``covalent_gcpbatch_plugin.function_source`` for the local stack."""
