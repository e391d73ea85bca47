"""The lattice: several hosts, one desired state, on NATS JetStream (nats-py only here).

naming.py       buckets, subjects and reversible key encoding under the lattice's name
connection.py   LatticeAddress, Lattice: one connection, its buckets and object store
"""
