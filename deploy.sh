#!/usr/bin/env bash
# Deploy the pipeline to a Google Cloud project. NOT IMPLEMENTED YET (tracked in the issue
# "Deploy to a real Google Cloud project"). It refuses to pretend.
set -euo pipefail
echo "deploy.sh is not implemented yet: nothing was created. Use 'covalent-gcpbatch local up' for the local stack." >&2
exit 2
