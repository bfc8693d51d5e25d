// Drives the system Chromium (headless, software WebGL) through OHIF with playwright-core and reports what
// OHIF shows, as JSON on stdout (and in <out>/<name>.json), with screenshots in <out>.
//
//   node tests/ohif/ohif_check.mjs '<spec JSON>'
//
// spec: {
//   check: "seg" | "image" | "sr",
//   url: viewer URL (…/viewer?StudyInstanceUIDs=…&initialSeriesInstanceUID=…),
//   out: folder for screenshots and the JSON result, name: file name stem,
//   playwright: path of the playwright-core package, chromium: path of the browser,
//   segments: ["Right lung", …]   (seg: the segment names to wait for in the segmentation panel)
//   steps: [{texts: ["Volume:", …], slice: "I:21 "}, …] (sr: per measurement group, the labels to wait for on
//          its image and that image's slice label; see the sr branch)
//   timeoutMs: per wait (default 60000)
// }
// Every wait is on a DOM condition with a timeout; a wait that fails is reported in `failures`, with the
// page errors and a screenshot of the page at that moment, rather than thrown.
import { createRequire } from 'module';
import fs from 'fs';
import path from 'path';

const spec = JSON.parse(process.argv[2]);
const require = createRequire(import.meta.url);
const { chromium } = require(spec.playwright);
const timeout = spec.timeoutMs || 60000;
fs.mkdirSync(spec.out, { recursive: true });
const file = (suffix) => path.join(spec.out, `${spec.name}-${suffix}`);

const result = { check: spec.check, url: spec.url, failures: [], pageErrors: [], consoleErrors: [],
                 httpErrors: [], screenshots: [], timings: {} };
const t0 = Date.now();
const mark = (what) => { result.timings[what] = (Date.now() - t0) / 1000; };

const browser = await chromium.launch({
  executablePath: spec.chromium,
  headless: true,
  args: [
    '--no-sandbox', '--disable-dev-shm-usage',
    // Software WebGL (SwiftShader through ANGLE): cornerstone renders with WebGL and no GPU is needed.
    '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist',
    // No outbound connections of Chromium's own (refused on closed networks, and slow to time out).
    '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--disable-default-apps', '--disable-features=Translate,MediaRouter,OptimizationHints',
  ],
});
const context = await browser.newContext({ viewport: { width: 1600, height: 1000 }, deviceScaleFactor: 1 });
// OHIF's onboarding tour ("Scrolling Through Images", 11 steps) would cover the viewer: mark it shown.
await context.addInitScript(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));
const page = await context.newPage();
page.on('pageerror', (e) => result.pageErrors.push(String(e.stack || e.message).slice(0, 1500)));
page.on('console', (m) => {
  const text = m.text();
  // OHIF reports errors caught by its React error boundaries with console.debug.
  if (m.type() === 'error' || /Error Boundary/.test(text)) result.consoleErrors.push(text.slice(0, 1500));
});
page.on('response', (r) => { if (r.status() >= 400) result.httpErrors.push(`${r.status()} ${r.url()}`); });

async function step(name, fn) {
  try {
    return await fn();
  } catch (e) {
    result.failures.push(`${name}: ${String(e.message).split('\n')[0]}`);
    const shot = file(`failed-${name.replace(/\W+/g, '-')}.png`);
    await page.screenshot({ path: shot }).catch(() => {});
    result.screenshots.push(shot);
    return undefined;
  }
}

async function shot(suffix, locator) {
  const p = file(suffix);
  await (locator || page).screenshot({ path: p });
  result.screenshots.push(p);
  return p;
}

// The pixels of the first viewport's canvas (what cornerstone rendered, without OHIF's DOM/SVG overlays).
async function canvasPng(suffix) {
  const dataUrl = await page.evaluate(() => document.querySelector('canvas.cornerstone-canvas').toDataURL('image/png'));
  const p = file(suffix);
  fs.writeFileSync(p, Buffer.from(dataUrl.split(',')[1], 'base64'));
  result.screenshots.push(p);
  return p;
}

const viewport = page.locator('[data-cy="viewport-pane"]').first();
const sliceLabel = page.locator('[data-cy="viewport-overlay-bottom-right"]').first();

async function imageShown() {
  // An image is on screen once the viewport's overlay shows its position in the stack ("I:21 (21/40)", "1/1").
  await sliceLabel.filter({ hasText: /\d+\s*\/\s*\d+/ }).waitFor({ timeout });
  await page.locator('canvas.cornerstone-canvas').first().waitFor({ timeout });
  // Rendering happens on the next animation frames; wait until the canvas holds more than one colour.
  await page.waitForFunction(() => {
    const c = document.querySelector('canvas.cornerstone-canvas');
    if (!c || !c.width) return false;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 4; i < d.length; i += 4 * 97) if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) return true;
    return false;
  }, null, { timeout, polling: 250 });
  result.sliceLabel = (await sliceLabel.innerText()).trim();
}

await step('open viewer', async () => {
  await page.goto(spec.url, { timeout });
  await page.locator('[data-cy="viewport-pane"]').first().waitFor({ timeout });
  mark('viewer');
});

if (result.failures.length) {
  // The viewer itself did not come up: nothing else to check.
} else if (spec.check === 'image') {
  await step('image displayed', imageShown);
  mark('image');
  if (!result.failures.length) {
    result.canvas = await canvasPng('canvas.png');
    await shot('page.png');
  }
} else if (spec.check === 'seg') {
  // With initialSeriesInstanceUID = the SEG series, OHIF shows the referenced CT with the SEG as a
  // preview overlay and offers to load it (a LOAD button on the viewport, and sometimes a prompt).
  await step('SEG preview displayed', async () => {
    await imageShown();
    await page.getByText('LOAD', { exact: true }).first().waitFor({ timeout });
  });
  mark('preview');
  if (!result.failures.length) {
    result.previewCanvas = await canvasPng('preview-canvas.png');
    await shot('preview-page.png');
  }
  await step('load SEG', async () => {
    const yes = page.getByText('Yes', { exact: true });
    if (await yes.isVisible()) await yes.click();
    else await page.getByText('LOAD', { exact: true }).first().click();
    // Loaded: the LOAD button goes away (the overlay now belongs to the CT viewport).
    await page.getByText('LOAD', { exact: true }).first().waitFor({ state: 'detached', timeout });
  });
  await step('segmentation panel lists the segments', async () => {
    const title = page.locator('[data-cy="data-row-title"]');
    if (!(await title.first().isVisible())) await page.locator('[data-cy="panelSegmentation-btn"]').click();
    for (const name of spec.segments) await title.filter({ hasText: new RegExp(`^\\s*${name}\\s*$`) }).first().waitFor({ timeout });
    result.segmentRows = await page.evaluate(() => [...document.querySelectorAll('[data-cy="data-row"]')].map((row) => {
      const title = row.querySelector('[data-cy="data-row-title"]');
      const dot = row.querySelector('[data-cy="data-row-colorhex"]');
      return { label: title ? title.textContent.trim() : null,
               color: dot ? getComputedStyle(dot).backgroundColor : null };
    }));
    result.segmentationLabels = await page.evaluate(() =>
      (window.services?.segmentationService?.getSegmentations() || []).map((s) => s.label));
  });
  mark('panel');
  await step('jump to a slice with every segment', async () => {
    // Clicking a segment row centres the viewport on that segment (OHIF jumps to its middle slice).
    const before = (await sliceLabel.innerText()).trim();
    await page.locator('[data-cy="data-row-title"]').filter({ hasText: spec.segments[spec.segments.length - 1] }).first().click();
    await page.waitForFunction((b) => document.querySelector('[data-cy="viewport-overlay-bottom-right"]').innerText.trim() !== b,
      before, { timeout: 10000 }).catch(() => {});
    await page.mouse.move(5, 995); // away from the panel: its hover card would cover the image
    await imageShown();
  });
  mark('jump');
  if (!result.failures.length) {
    result.canvas = await canvasPng('canvas.png');
    await shot('page.png');
  }
} else if (spec.check === 'sr') {
  // Either the measurements are drawn on the image (SVG annotations with their labels), or OHIF fails.
  // spec.steps: one per measurement group, in the SR's order: {texts: label prefixes ("Volume:"), as many
  // times as they must appear on that group's image, slice: the prefix its slice label must have ("I:21 ")}.
  // OHIF opens the SR on the first group's image; the viewport's right arrow steps to the next group's.
  const steps = spec.steps;
  const textsShown = (texts) => page.waitForFunction((want) => {
    const lines = [...document.querySelectorAll('[data-cy="viewport-pane"] svg text tspan')].map((t) => t.textContent.trim());
    const need = {};
    for (const t of want) need[t] = (need[t] || 0) + 1;
    return Object.entries(need).every(([t, n]) => lines.filter((l) => l.startsWith(t)).length >= n);
  }, texts, { timeout, polling: 250 });
  const sliceShown = (prefix) => page.waitForFunction((want) =>
    (document.querySelector('[data-cy="viewport-overlay-bottom-right"]')?.innerText || '').trim().startsWith(want),
  prefix || '', { timeout, polling: 250 });
  const view = async () => ({
    // Read without waiting: after a crash there is no slice label.
    sliceLabel: await page.evaluate(() =>
      (document.querySelector('[data-cy="viewport-overlay-bottom-right"]')?.innerText || '').trim()),
    // Each label line of an annotation is a <tspan> ("Volume: 1450.35 mL").
    svgTexts: await page.evaluate(() => [...document.querySelectorAll('[data-cy="viewport-pane"] svg text tspan')]
      .map((t) => t.textContent.trim()).filter(Boolean)),
    svgShapes: await page.evaluate(() => document.querySelectorAll(
      '[data-cy="viewport-pane"] svg path, [data-cy="viewport-pane"] svg polyline, [data-cy="viewport-pane"] svg polygon').length),
  });
  const drawn = (async () => {
    await imageShown();
    await sliceShown(steps[0].slice);
    await textsShown(steps[0].texts);
    return 'drawn';
  })();
  const failed = page.waitForEvent('console', { predicate: (m) => /Error Boundary/.test(m.text()), timeout })
    .then(() => 'error boundary');
  const outcome = await step('SR measurements drawn', () => Promise.race([drawn, failed]));
  drawn.catch(() => {}); failed.catch(() => {});
  result.outcome = outcome || 'timeout';
  if (outcome === 'error boundary') result.failures.push('OHIF hit an error (React error boundary) showing the SR');
  mark('sr');
  Object.assign(result, await view());
  result.notifications = await page.evaluate(() => [...document.querySelectorAll('[data-sonner-toast], [role="status"], li[data-type]')]
    .map((n) => n.innerText.trim()).filter(Boolean));
  await page.mouse.move(5, 995);
  await shot('page.png');
  if (outcome === 'drawn') {
    result.steps = [{ ...(await view()), viewport: await shot('group-1.png', viewport) }];
    for (let i = 1; i < steps.length && !result.failures.length; i++) {
      await step(`go to measurement group ${i + 1}`, async () => {
        await page.locator('[data-cy="viewport-action-arrows-right"] svg').first().click();
        await sliceShown(steps[i].slice);
        await textsShown(steps[i].texts);
      });
      await page.mouse.move(5, 995);
      result.steps.push({ ...(await view()), viewport: await shot(`group-${i + 1}.png`, viewport) });
    }
    mark('steps');
  }
}

result.bodyText = (await page.evaluate(() => document.body.innerText).catch(() => '')).slice(0, 4000);
mark('total');
await browser.close();
const out = JSON.stringify(result, null, 1);
fs.writeFileSync(file('result.json'), out);
process.stdout.write(out + '\n');
