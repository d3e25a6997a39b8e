/** Owner notices in the real store: each key recorded once, with one `notice.sent` audit event. */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import * as store from '../common/store/index.js';
import { TestContext } from './support/context.js';
import { insertTokenRow } from './support/tokens.js';

let ctx: TestContext;
before(async () => {
  ctx = await TestContext.create('notices');
});
after(async () => ctx?.close());

describe('notices', () => {
  it('should record a notice once per key, audited once, and tell whether it was sent', async () => {
    const token = await insertTokenRow(ctx.pool, { subject: 'usr_notice' });
    const key = `expiring:expiry:${token.expiresAt}:60000`;
    assert.equal(await store.isNoticeSent(ctx.pool, token.id, key), false);
    const notice = { tokenId: token.id, key, kind: 'token.expiring', data: { reason: 'expiry' } };
    assert.equal(await store.recordNotice(ctx.pool, notice), true);
    assert.equal(await store.recordNotice(ctx.pool, notice), false, 'a retry records nothing');
    assert.equal(await store.isNoticeSent(ctx.pool, token.id, key), true);
    assert.equal(await store.isNoticeSent(ctx.pool, token.id, `${key}-other`), false);
    const sent = (await store.readAudit(ctx.pool, token.id)).filter((e) => e.kind === 'notice.sent');
    assert.equal(sent.length, 1);
    assert.deepEqual(JSON.parse(sent[0]!.canonical).data, { key, kind: 'token.expiring', reason: 'expiry' });
  });
});
