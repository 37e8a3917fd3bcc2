"""The Python client of the syncbn service: `Client` (and its asyncio twin `AsyncClient`).

```python
from service.client import Client

with Client("http://127.0.0.1:8000", token=None, timeout=30) as client:
    job = client.submit("deploy/examples/digits-cpu.json")     # a JobSpec, a dict, or a .json/.yaml path
    for event in client.events(job.id):                        # live; resumes by itself after a dropped connection
        print(event.id, event.type, event.data)
    job = client.wait(job.id)                                  # JobPublic: status, summary, error
    client.download_model(job.id, "model.pt")
```

Results are the API's own response models (`service.api.models`). Every error is a `ClientError` carrying
`status_code` (None when no answer came), the service's sentence (`detail`) and the response; the hierarchy is
drawn at the top of `service/client/_errors.py`. Connection errors and 503 answers are retried with backoff
(`RetryPolicy`); no other error is.
"""

from service.client._async_client import AsyncClient
from service.client._client import Client
from service.client._errors import (
    APIError,
    AuthenticationError,
    ClientError,
    ConflictError,
    ConnectionFailedError,
    InvalidRequestError,
    NotFoundError,
    ServerError,
    ServiceUnavailableError,
    SpecError,
    UnexpectedResponseError,
    WaitTimeoutError,
)
from service.client._retry import RetryPolicy
from service.client._sse import Event

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ClientError",
    "ConflictError",
    "ConnectionFailedError",
    "Event",
    "InvalidRequestError",
    "NotFoundError",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailableError",
    "SpecError",
    "UnexpectedResponseError",
    "WaitTimeoutError",
]
