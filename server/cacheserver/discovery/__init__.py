"""Auto discovery as ElastiCache serves it: every appliance answers ``config get cluster``
(and the older ``get AmazonElastiCache:cluster``) with the list of all appliances of its
cluster, so a client configured with one address finds every shard.

``membership`` parses the file the operator publishes and formats the replies (no I/O);
``watch`` keeps the served membership in step with that file.
"""
