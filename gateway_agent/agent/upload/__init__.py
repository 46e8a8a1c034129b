"""Upload: send outbox rows to their destination and record each outcome in the outbox.

``uploader`` (the upload workers), ``destinations`` (the contract, and one module per kind).
"""
