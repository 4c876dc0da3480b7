// Add prime-counting jobs from Node.js with the npm bullmq package, and optionally wait for them.
//
// Usage:
//   node examples/add_jobs.js --redis redis://127.0.0.1:PORT/0 [--count 3] [--below 2000000]
//                             [--timeout-ms MS] [--wait SECONDS] [--queue primes] [--prefix bull]
//
// Install the package first (`npm install bullmq`), or point NODE_PATH at a node_modules
// directory that has it. The script prints one job id per line. With --wait it then prints each
// job's return value or failedReason. The exit status is 1 when a job failed or had not finished
// in time, and 2 for invalid arguments.
'use strict';

const { parseArgs } = require('node:util');
const { Queue, QueueEvents } = require('bullmq');

const REDIS_URL_VARIABLE = 'SANDBOX_RUNTIME_REDIS_URL';

function parseArguments(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      redis: { type: 'string', default: process.env[REDIS_URL_VARIABLE] },
      queue: { type: 'string', default: 'primes' },
      prefix: { type: 'string', default: 'bull' },
      count: { type: 'string', default: '3' },
      below: { type: 'string', default: '2000000' },
      'timeout-ms': { type: 'string' },
      wait: { type: 'string' },
    },
  });
  if (!values.redis) {
    throw new Error(
      `no Redis URL: pass --redis URL or set ${REDIS_URL_VARIABLE} (serve logs the URL of its embedded Redis)`,
    );
  }
  return {
    redis: values.redis,
    queue: values.queue,
    prefix: values.prefix,
    count: positiveInteger('--count', values.count),
    below: positiveInteger('--below', values.below),
    timeoutMs: values['timeout-ms'] === undefined ? undefined : positiveInteger('--timeout-ms', values['timeout-ms']),
    waitSeconds: values.wait === undefined ? undefined : positiveNumber('--wait', values.wait),
  };
}

function positiveInteger(option, text) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1) {
    throw new Error(`${option} must be a positive integer, got ${JSON.stringify(text)}`);
  }
  return value;
}

function positiveNumber(option, text) {
  const value = Number(text);
  if (!(value > 0)) {
    throw new Error(`${option} must be a positive number of seconds, got ${JSON.stringify(text)}`);
  }
  return value;
}

// BullMQ takes ioredis connection options; translate a redis:// or rediss:// URL into them.
function connectionOptions(url) {
  const parsed = new URL(url);
  if (parsed.protocol !== 'redis:' && parsed.protocol !== 'rediss:') {
    throw new Error(`--redis must be a redis:// or rediss:// URL, got ${JSON.stringify(url)}`);
  }
  const options = {
    host: parsed.hostname,
    port: Number(parsed.port || 6379),
    db: Number(parsed.pathname.slice(1) || 0),
    maxRetriesPerRequest: null,
  };
  if (parsed.username) options.username = decodeURIComponent(parsed.username);
  if (parsed.password) options.password = decodeURIComponent(parsed.password);
  if (parsed.protocol === 'rediss:') options.tls = {};
  return options;
}

async function main() {
  const args = parseArguments(process.argv.slice(2));
  const connection = connectionOptions(args.redis);
  const queue = new Queue(args.queue, { connection, prefix: args.prefix });
  // Subscribed before the jobs are added, so no completion event can be missed.
  const events = args.waitSeconds === undefined ? null : new QueueEvents(args.queue, { connection, prefix: args.prefix });
  try {
    if (events) await events.waitUntilReady();

    const data = { below: args.below };
    if (args.timeoutMs !== undefined) data.timeoutMs = args.timeoutMs;
    const jobs = [];
    for (let index = 0; index < args.count; index += 1) {
      jobs.push(await queue.add(`primes-${index + 1}`, data, { attempts: 1 }));
    }
    for (const job of jobs) console.log(job.id);
    if (!events) return 0;

    // waitUntilFinished resolves with the return value and rejects with the failedReason, or
    // with a timeout error once the ttl has passed.
    const ttlMs = args.waitSeconds * 1000;
    const results = await Promise.allSettled(jobs.map((job) => job.waitUntilFinished(events, ttlMs)));
    let status = 0;
    for (const [index, result] of results.entries()) {
      const id = jobs[index].id;
      if (result.status === 'fulfilled') {
        console.log(`job ${id} completed: ${JSON.stringify(result.value)}`);
      } else {
        console.log(`job ${id} did not complete: ${result.reason.message}`);
        status = 1;
      }
    }
    return status;
  } finally {
    if (events) await events.close();
    await queue.close();
  }
}

main().then(
  (status) => process.exit(status),
  (error) => {
    process.stderr.write(`add_jobs.js: ${error.message}\n`);
    process.exit(2);
  },
);
