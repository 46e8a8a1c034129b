"""Upload: send outbox rows to their destination and record each outcome in the outbox.

``uploader`` (the upload workers: circuit check, claim, batches filling), ``outcomes`` (what a
result or an error means for the rows and the destination circuit), ``journal`` (outcome writes
kept in order and retried when the state disk fails), ``destinations`` (the contract, and one
module per kind).
"""
