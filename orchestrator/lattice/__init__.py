"""The lattice: several hosts, one desired state, on NATS JetStream (nats-py only here).

naming.py       buckets, subjects and reversible key encoding under the lattice's name
connection.py   LatticeAddress, Lattice: one connection, its buckets and object store
kvstore.py      JetStreamKV: the capsules' KV store on the lattice (a KVBackend)
  kvcommit.py     its group commit: one atomic batch in flight per host, retries, outcomes
  kvread.py       its reads: a key, a capsule's listing, the capsules
  kvfair.py       turns between hosts contending for one capsule
  txn.py          one atomic batch: its checks and writes as messages, sending, settling
  kvstage.py      a host's staged calls and the version stamps of their reads
  kvkeys.py       the KV's subjects and the limits NATS imposes
"""
