// Add one job with the npm bullmq package, wait for it to finish, and print how it ended.
//
// Usage: node add_and_wait.js REDIS_URL QUEUE DATA_JSON [TIMEOUT_MS]
//
// Prints {"id", "state", "returnvalue", "failedReason"} as JSON on stdout and exits 0, or prints the
// error on stderr and exits 1.
'use strict';

const { Queue, QueueEvents, Job } = require('bullmq');

async function main() {
  const [url, queueName, dataJson, timeoutText] = process.argv.slice(2);
  if (!url || !queueName || !dataJson) {
    throw new Error('usage: node add_and_wait.js REDIS_URL QUEUE DATA_JSON [TIMEOUT_MS]');
  }
  const parsed = new URL(url);
  const connection = { host: parsed.hostname, port: Number(parsed.port || 6379) };
  const queue = new Queue(queueName, { connection });
  const events = new QueueEvents(queueName, { connection });
  try {
    await events.waitUntilReady();
    const job = await queue.add('from-node', JSON.parse(dataJson));
    try {
      await job.waitUntilFinished(events, Number(timeoutText || 30000));
    } catch (error) {
      // A failed job rejects here; its state is read below either way.
    }
    const stored = await Job.fromId(queue, job.id);
    const state = await stored.getState();
    console.log(JSON.stringify({
      id: job.id,
      state,
      returnvalue: stored.returnvalue,
      failedReason: stored.failedReason || null,
    }));
  } finally {
    await events.close();
    await queue.close();
  }
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : String(error));
  process.exit(1);
});
