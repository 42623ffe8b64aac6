"""Create the MLflow user the workers sign in as (once; an existing user is left as it is).

Run by compose's one-shot `mlflow-users` service with the admin's credentials. Everything
comes from the environment; nothing is printed but the user name."""

import base64
import json
import os
import sys
import urllib.error
import urllib.request

server = os.environ["MLFLOW_SERVER_URL"].rstrip("/")
admin = f"{os.environ['MLFLOW_AUTH_ADMIN_USERNAME']}:{os.environ['MLFLOW_AUTH_ADMIN_PASSWORD']}"
user, password = os.environ["RECALL_MLFLOW_USERNAME"], os.environ["RECALL_MLFLOW_PASSWORD"]

request = urllib.request.Request(
    f"{server}/api/2.0/mlflow/users/create",
    data=json.dumps({"username": user, "password": password}).encode(),
    headers={"Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(admin.encode()).decode()},
    method="POST",
)
try:
    urllib.request.urlopen(request, timeout=30).close()
    print(f"MLflow user {user} created")
except urllib.error.HTTPError as exc:
    if "RESOURCE_ALREADY_EXISTS" not in exc.read().decode(errors="replace"):
        sys.exit(f"creating MLflow user {user} failed: HTTP {exc.code}")
    print(f"MLflow user {user} exists")
