#!/usr/bin/env python3
"""librdkafka peer for sitewatch's wire-compatibility tests (confluent-kafka from PyPI).

    kpeer.py produce BROKERS TOPIC [--compression gzip] [--partitioner murmur2_random]
        stdin: one record per line, "key<TAB>value" (UTF-8). Prints "produced N".
    kpeer.py consume BROKERS TOPIC COUNT [--timeout SECONDS]
        Reads COUNT records from the beginning of every partition (no consumer group
        offsets: explicit assignment). Prints "partition<TAB>offset<TAB>key<TAB>value<TAB>ts".
    kpeer.py group BROKERS TOPIC GROUP
        Joins consumer group GROUP (range assignor, session timeout 6 s) subscribed to TOPIC
        and prints "assigned P,Q,..." after every rebalance (an empty list when it got none),
        until stdin closes; then leaves the group and prints "left".
    kpeer.py versions
        Prints the librdkafka version.

Exit status 0 on success; errors go to stderr.
"""
import sys
import time

import confluent_kafka as ck


def produce(brokers, topic, opts):
    conf = {
        "bootstrap.servers": brokers,
        "acks": "all",
        "linger.ms": 5,
        "enable.idempotence": False,
        "api.version.request": True,
    }
    if "--compression" in opts:
        conf["compression.type"] = opts[opts.index("--compression") + 1]
    if "--partitioner" in opts:
        conf["partitioner"] = opts[opts.index("--partitioner") + 1]
    p = ck.Producer(conf)
    errors = []

    def report(err, _msg):
        if err is not None:
            errors.append(str(err))

    n = 0
    for line in sys.stdin.buffer:
        line = line.rstrip(b"\n")
        if not line:
            continue
        key, _, value = line.partition(b"\t")
        while True:
            try:
                p.produce(topic, key=key, value=value, on_delivery=report)
                break
            except BufferError:
                p.poll(0.1)
        n += 1
        p.poll(0)
    left = p.flush(60)
    if left or errors:
        print(f"not delivered: {left}, errors: {errors[:5]}", file=sys.stderr)
        sys.exit(1)
    print(f"produced {n}")


def consume(brokers, topic, count, opts):
    timeout = float(opts[opts.index("--timeout") + 1]) if "--timeout" in opts else 60.0
    c = ck.Consumer({
        "bootstrap.servers": brokers,
        "group.id": "sitewatch-kpeer",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "api.version.request": True,
    })
    md = c.list_topics(topic, timeout=30)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        print(f"topic {topic}: {t.error if t else 'missing'}", file=sys.stderr)
        sys.exit(1)
    c.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in sorted(t.partitions)])
    got = 0
    deadline = time.monotonic() + timeout
    out = sys.stdout
    while got < count and time.monotonic() < deadline:
        msgs = c.consume(num_messages=1000, timeout=0.5)
        for m in msgs:
            if m.error() is not None:
                if m.error().code() == ck.KafkaError._PARTITION_EOF:
                    continue
                print(f"consume error: {m.error()}", file=sys.stderr)
                sys.exit(1)
            key = (m.key() or b"").decode()
            value = (m.value() or b"").decode()
            out.write(f"{m.partition()}\t{m.offset()}\t{key}\t{value}\t{m.timestamp()[1]}\n")
            got += 1
    c.close()
    if got < count:
        print(f"only {got} of {count} records within {timeout}s", file=sys.stderr)
        sys.exit(1)


def group(brokers, topic, group_id):
    import threading

    c = ck.Consumer({
        "bootstrap.servers": brokers,
        "group.id": group_id,
        "partition.assignment.strategy": "range",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "enable.auto.commit": False,
    })

    def assigned(_consumer, partitions):
        print("assigned " + ",".join(str(p.partition) for p in sorted(partitions, key=lambda p: p.partition)), flush=True)

    def revoked(_consumer, _partitions):
        print("revoked", flush=True)

    c.subscribe([topic], on_assign=assigned, on_revoke=revoked)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    while not done.is_set():
        c.poll(0.2)
    c.close()
    print("left", flush=True)


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    cmd = args[0]
    if cmd == "produce" and len(args) >= 3:
        produce(args[1], args[2], args[3:])
    elif cmd == "consume" and len(args) >= 4:
        consume(args[1], args[2], int(args[3]), args[4:])
    elif cmd == "group" and len(args) == 4:
        group(args[1], args[2], args[3])
    elif cmd == "versions":
        print(ck.libversion()[0])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
