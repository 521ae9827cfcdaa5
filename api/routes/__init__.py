"""HTTP routes; each module exposes `router`. Thin: validation and status codes here, queries in storage/."""
