"""`exolaunch batch`: a file of OpenAI batch requests through the cluster, resumable."""
