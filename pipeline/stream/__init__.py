"""The update loop's input: batches of new classes in a folder or an S3 prefix.

Layout (design section 6)::

    <source>/<batch>/<class name>/<image>                    hash split into train/test
    <source>/<batch>/train/<class name>/<image>  +  <batch>/test/<class name>/<image>
    <source>/<batch>/_READY                                   written last by the producer

A class folder's name is the class name with ``_`` read as a space. ``recall ingest``
takes every ready batch that the ledger does not have yet, in the sort order of the batch
names, validates it and appends one ledger entry: an accepted batch becomes the next task
(and gets a task manifest listing its files with their MD5), a rejected one is recorded
with its reason. With ``dataset.ledger_uri`` the authoritative ledger is one object per
entry in a bucket (or folder), each created only if absent, so two ingests running at once
can never both write entry k; the local ``ledger.yaml`` is its copy.

Region and credentials come only from the standard AWS environment and config chain;
no message here ever carries a credential.
"""
