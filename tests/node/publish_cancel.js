// Publish one cancel message on a control channel with ioredis, as a Node application would.
//
// Usage: node publish_cancel.js REDIS_URL CHANNEL JOB_ID [REASON] [--numeric-id]
//
// --numeric-id sends jobId as a JSON number instead of a string. The script prints the PUBLISH
// result (the number of subscribed clients) as JSON on stdout and exits with status 0, or prints
// the error on stderr and exits with status 1.
'use strict';

const Redis = require('ioredis');

function parseArguments(argv) {
  const flags = argv.filter((arg) => arg.startsWith('--'));
  const positional = argv.filter((arg) => !arg.startsWith('--'));
  const unknown = flags.filter((flag) => flag !== '--numeric-id');
  if (positional.length < 3 || positional.length > 4 || unknown.length > 0) {
    throw new Error(
      'usage: node publish_cancel.js REDIS_URL CHANNEL JOB_ID [REASON] [--numeric-id]' +
        (unknown.length > 0 ? ` (unknown option ${unknown.join(' ')})` : ''),
    );
  }
  const [url, channel, jobId, reason] = positional;
  const numericId = flags.includes('--numeric-id');
  if (numericId && !/^\d+$/.test(jobId)) {
    throw new Error(`--numeric-id needs a decimal JOB_ID, got ${JSON.stringify(jobId)}`);
  }
  return { url, channel, jobId: numericId ? Number(jobId) : jobId, reason };
}

async function main() {
  const { url, channel, jobId, reason } = parseArguments(process.argv.slice(2));
  const message = { action: 'cancel', jobId };
  if (reason !== undefined) {
    message.reason = reason;
  }

  const client = new Redis(url, { maxRetriesPerRequest: 1, lazyConnect: true });
  try {
    await client.connect();
    const receivers = await client.publish(channel, JSON.stringify(message));
    process.stdout.write(JSON.stringify({ receivers }) + '\n');
  } finally {
    client.disconnect();
  }
}

main().catch((error) => {
  process.stderr.write(`publish_cancel.js: ${error.message}\n`);
  process.exit(1);
});
