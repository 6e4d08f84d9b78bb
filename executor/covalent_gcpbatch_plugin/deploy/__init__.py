"""What deploy.sh needs from Python, by domain (deploy_helper.py is the command line over them):

* ``cloud``: the bucket's lifecycle and checks, IAM binding checks, the function's environment;
* ``image``: the dispatching environment's versions, the worker image's Cloud Build config, digests;
* ``covalent``: the ``[executors.gcpbatch]`` section of the Covalent config.

Only the standard library, pydantic and filelock/toml (Covalent's own dependencies) are imported:
every environment Covalent dispatches from has them.
"""
